//! The machine: KVM VM, guest memory, interrupt controller, platform devices, ACPI tables, vCPU
//! threads, and the main event loop that runs until the guest powers off or something fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::{Arc, Mutex, RwLock};

use devices::acpi_hotplug::{AcpiHotplugController, ACPI_HOTPLUG_PORTS};
use devices::hotplug::topology::{FIRST_ROOT_BUS_SLOT, FIRST_ROOT_PORT_SLOT};
use devices::hotplug::{
    BusId, HotplugControl, Options as HotplugOptions, PortMode, SlotId, SurprisePolicy, Topology,
};
use devices::interrupt::InterruptLine;
use devices::osc_report::{OscReport, OSC_REPORT_PORTS};
use devices::pci::{
    BarReprogrammingHandler, BarSpace, Bdf, PciConfigIo, PciConfigMmio, PciHostBridge, PciRoot,
};
use devices::power_control::{
    PowerControl, PowerHandler, POWER_CONTROL_PORTS, RESET_OFFSET, RESET_VALUE,
    SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use devices::serial::{SerialDevice, SerialDeviceState, SERIAL_PORT_SIZE};
use devices::virtio::block::Disk;
use devices::virtio::GuestRam;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use std::os::unix::thread::JoinHandleExt;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot;
use crate::config::{Cli, SerialMode};
use crate::console::{ConsoleInput, EventFdNotifier};
use crate::control::MachineControl;
use crate::exit::{ExitSignal, ExitWatcher, VmExit};
use crate::hotplug::Hotplug;
use crate::interrupts::GsiRouter;
use crate::layout::*;
use crate::migration::compat::{ColdDisk, MachineConfig};
use crate::migration::incoming::{Answer, Incoming};
use crate::migration::uri::MigrationUri;
use crate::pci_devices::{DiskImage, DiskSpec, PciDevices};
use crate::run_state::RunStates;
use crate::runtime::{Platform, Runtime, Shared};
use crate::vcpu::{Vcpu, VcpuSet};

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A command line asking for a machine that cannot be built; checked before anything is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--root-port-hotplug` names a port that does not exist.
    #[error("{0}")]
    RootPortHotplug(String),
    /// `--disk ...,bus=` names a bus the machine does not have.
    #[error("--disk {path}: bus '{bus}' does not exist (this machine has pcie.0{ports})")]
    NoSuchDiskBus {
        /// The disk's image.
        path: String,
        /// The bus given.
        bus: String,
        /// The root ports there are (" and rp0..rp3"), or nothing.
        ports: String,
    },
    /// Two `--disk`s in one root port's slot.
    #[error("--disk {path}: the slot of {port} already holds a disk")]
    DiskSlotTaken {
        /// The disk's image.
        path: String,
        /// The port.
        port: String,
    },
    /// More `--disk`s on `pcie.0` than it has slots.
    #[error("--disk {0}: no free slot on pcie.0")]
    NoRootBusSlot(String),
    /// `--incoming` is not a migration URI.
    #[error("--incoming: {0}")]
    Incoming(String),
}

/// A failure to build the machine.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{0}: {1}")]
    KvmIoctl(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuSetupError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::Error),
    #[error("cannot write {what} at {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("--disk {0}: {1}")]
    DiskOpen(String, #[source] io::Error),
    #[error("cannot open serial output {0}: {1}")]
    SerialFile(String, #[source] io::Error),
    #[error("cannot create hot-plug trace {0}: {1}")]
    TraceFile(String, #[source] io::Error),
    #[error("device bus: {0}: {1}")]
    Bus(String, #[source] vm_device::bus::Error),
    #[error("PCI bus: {0}: {1}")]
    PciBus(&'static str, #[source] devices::pci::PciBusError),
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
    #[error(transparent)]
    Devices(#[from] crate::pci_devices::AddDeviceError),
    #[error("--disk {id}: {source}")]
    ColdPlug {
        id: String,
        #[source]
        source: devices::hotplug::HotplugError,
    },
    #[error("control socket {0}: {1}")]
    Qmp(String, #[source] io::Error),
    #[error("incoming migration: {0}")]
    Incoming(String),
    #[error("restoring the machine: {0}")]
    Restore(String),
}

/// An interrupt line into KVM's in-kernel IOAPIC through an irqfd.
struct IrqfdLine(EventFd);

impl InterruptLine for IrqfdLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

struct ExitOnPower(Arc<ExitSignal>);

impl PowerHandler for ExitOnPower {
    fn power_off(&self) {
        self.0.request(VmExit::PowerOff);
    }
    fn reset(&self) {
        self.0.request(VmExit::Reset);
    }
}

/// A stdout writer that flushes every write, so the console is never held back.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.0.write(b)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Builds the machine from the command line — booting it, or taking it from a snapshot or a
/// migration (`--incoming`) — and runs it until it stops.
pub fn run(cli: &Cli) -> Result<VmExit, VmError> {
    let images = check_user_input(cli)?;
    let incoming = cli
        .incoming
        .as_deref()
        .map(|u| MigrationUri::parse(u, true))
        .transpose()
        .map_err(ConfigError::Incoming)?;
    if let Some(path) = &cli.hotplug_trace {
        crate::trace::open(path).map_err(|e| VmError::TraceFile(path.display().to_string(), e))?;
    }
    let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Io("eventfd", e))?);
    let events = crate::qmp::QmpEvents::default();
    let states = match incoming {
        Some(_) => RunStates::incoming(cli.paused),
        None => RunStates::booting(cli.paused),
    };
    let shared = Arc::new(Shared::new(events.clone(), states, exit));
    let (defer_tx, defer_rx) = std::sync::mpsc::channel();
    let defer = matches!(incoming, Some(MigrationUri::Defer)).then_some(defer_tx);
    let control = Arc::new(MachineControl::new(shared.clone(), defer));
    let start_qmp = |control: &Arc<MachineControl>| match &cli.qmp {
        Some(path) => {
            crate::qmp::QmpServer::start_with_events(path, control.clone(), events.clone())
                .map(Some)
                .map_err(|e| VmError::Qmp(path.display().to_string(), e))
        }
        None => Ok(None),
    };
    // With a migration coming in the control socket is up before the machine, to watch it
    // come (and to say where from, after `defer`); otherwise once the machine exists.
    let early_qmp = match incoming {
        Some(_) => start_qmp(&control)?,
        None => None,
    };
    let boot = match incoming {
        None => Boot::Fresh(images),
        Some(uri) => {
            let incoming = crate::migration::incoming::receive(
                uri,
                &machine_config(cli),
                &ram_regions(cli.memory),
                &shared,
                &defer_rx,
            )
            .map_err(VmError::Incoming)?;
            Boot::Restore(Box::new(incoming))
        }
    };
    let restoring = matches!(boot, Boot::Restore(_));
    let built = Machine::build(cli, boot, shared.clone());
    if restoring {
        let err = built.as_ref().err().map(|e| e.to_string());
        crate::migration::incoming::ended(&shared, err.as_deref().map_or(Ok(()), Err));
    }
    let (machine, answer) = built?;
    control.attach(machine.runtime.clone());
    let qmp = match early_qmp {
        Some(q) => Some(q),
        None => start_qmp(&control)?,
    };
    machine.run(qmp, answer)
}

/// How the machine starts: booting the kernel (with the `--disk` images, opened), or from a
/// snapshot or migration.
enum Boot {
    Fresh(Vec<Disk>),
    Restore(Box<Incoming>),
}

/// What the machine is made of, as a migration compares it.
pub fn machine_config(cli: &Cli) -> MachineConfig {
    MachineConfig {
        cpus: cli.cpus,
        memory: cli.memory,
        root_ports: (0..cli.root_ports)
            .map(|n| cli.root_port_hotplug.mode(n))
            .collect(),
        no_command_completed: cli.no_command_completed,
        osc_native_hotplug: cli.osc_native_hotplug,
        disks: cli
            .disk
            .iter()
            .map(|d| ColdDisk {
                path: d.path.clone(),
                id: d.id.clone(),
                readonly: d.readonly,
                bus: d.bus.clone(),
                format: d.format,
            })
            .collect(),
    }
}

/// Checks what the user gave before anything is built, so that their errors come first.
/// Returns each `--disk`'s image, opened and read, in order (none with `--incoming`, whose
/// images are checked by identity): the disks are plugged with these, not opened again.
fn check_user_input(cli: &Cli) -> Result<Vec<Disk>, VmError> {
    // With --incoming the guest comes with its memory: kernel and initramfs are not read.
    if cli.incoming.is_none() {
        if let Some(kernel) = &cli.kernel {
            File::open(kernel)
                .map_err(|e| boot::BootError::KernelOpen(kernel.display().to_string(), e))?;
        }
        if let Some(p) = &cli.initramfs {
            File::open(p)
                .map_err(|e| boot::BootError::InitramfsOpen(p.display().to_string(), e))?;
        }
    }

    cli.root_port_hotplug
        .check(cli.root_ports)
        .map_err(ConfigError::RootPortHotplug)?;
    let mut ports_taken = std::collections::BTreeSet::new();
    for d in &cli.disk {
        let is_port = d
            .bus
            .strip_prefix("rp")
            .and_then(|n| n.parse::<u8>().ok())
            .is_some_and(|n| n < cli.root_ports && d.bus == format!("rp{n}"));
        if d.bus != "pcie.0" && !is_port {
            return Err(ConfigError::NoSuchDiskBus {
                path: d.path.display().to_string(),
                bus: d.bus.clone(),
                ports: match cli.root_ports {
                    0 => String::new(),
                    1 => " and rp0".to_string(),
                    n => format!(" and rp0..rp{}", n - 1),
                },
            }
            .into());
        }
        if is_port && !ports_taken.insert(d.bus.clone()) {
            return Err(ConfigError::DiskSlotTaken {
                path: d.path.display().to_string(),
                port: d.bus.clone(),
            }
            .into());
        }
    }
    // Each image opened and its format read now, so that a path that is no disk (a directory,
    // a FIFO, a missing or unreadable file, a qcow2 that is not one) stops the VMM with its own
    // error before the kernel is read. With --incoming the images are checked by identity.
    if cli.incoming.is_some() {
        return Ok(Vec::new());
    }
    cli.disk
        .iter()
        .map(|d| {
            Disk::open_format(&d.path, d.readonly, d.format)
                .map_err(|e| VmError::DiskOpen(d.path.display().to_string(), e))
        })
        .collect()
}

/// A machine built and ready to run: its vCPUs not started yet.
struct Machine {
    runtime: Arc<Runtime>,
    /// Signalled when the console's input FIFO drains.
    drained: EventFd,
    vcpus: Vec<Vcpu>,
    /// The MSRs the vCPUs' states are saved with.
    msrs: Arc<Vec<u32>>,
    /// Taken from a snapshot or migration: whether the source ran.
    restored: Option<bool>,
    stdio: bool,
}

impl Machine {
    /// KVM VM, guest memory, platform devices, PCI, ACPI and MP tables, the guest loaded (or
    /// the state of a snapshot or migration restored into all of them), the hot-plug worker
    /// started, the vCPUs created; also returns how to tell a migration's source the outcome.
    fn build(cli: &Cli, boot: Boot, shared: Arc<Shared>) -> Result<(Self, Answer), VmError> {
        let (mem, start, answer) = match boot {
            Boot::Fresh(images) => (
                create_memory(cli.memory)?,
                Start::Boot(images),
                Answer::default(),
            ),
            Boot::Restore(incoming) => {
                let Incoming {
                    memory,
                    state,
                    disk_files,
                    node_files,
                    answer,
                } = *incoming;
                (
                    memory,
                    Start::Restore(Box::new((state, disk_files, node_files))),
                    answer,
                )
            }
        };
        match Self::build_with(cli, mem, start, shared) {
            Ok(machine) => Ok((machine, answer)),
            Err(e) => {
                answer.send(Err(&e.to_string()));
                Err(e)
            }
        }
    }

    fn build_with(
        cli: &Cli,
        mem: GuestRam,
        start: Start,
        shared: Arc<Shared>,
    ) -> Result<Self, VmError> {
        let (saved, disk_files, node_files, images) = match start {
            Start::Restore(restore) => {
                let (state, disks, nodes) = *restore;
                (Some(state), disks, nodes, Vec::new())
            }
            Start::Boot(images) => (None, Default::default(), Default::default(), images),
        };
        let state = saved.as_ref();
        // The kernel and initramfs are copied into guest memory on a thread of their own while
        // this one makes the VM, its memory slot and its devices: the two are the bulk of the
        // time to the first KVM_RUN (docs/performance.md).
        let loading = match state {
            Some(_) => None,
            None => Some(KernelLoad::start(cli, &mem)?),
        };
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VM", e))?,
        );
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_TSS_ADDR", e))?;
        if let Err(e) = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        vm.create_irq_chip()
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_IRQCHIP", e))?;

        crate::memory_slots::register(&vm, &mem, false)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_USER_MEMORY_REGION", e))?;
        let exit = shared.exit.clone();
        let mut io_mgr = IoManager::new();
        let (serial, drained) =
            add_console(cli, &vm, &mut io_mgr, state.map(|s| &s.platform.serial))?;

        // Power off and reset.
        let power = Arc::new(Mutex::new(PowerControl::new(Box::new(ExitOnPower(
            exit.clone(),
        )))));
        if let Some(s) = state {
            lock(&power).restore_sleep_status(s.platform.sleep_status);
        }
        register_pio(&mut io_mgr, POWER_PORT, POWER_CONTROL_PORTS, power.clone())?;

        // PCI: the root complex with its host bridge, reachable through both configuration mechanisms.
        let pci_root = Arc::new(Mutex::new(PciRoot::new()));
        let host_bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        if let Some(s) = state {
            lock(&host_bridge)
                .restore(&s.platform.host_bridge)
                .map_err(|e| VmError::Restore(e.to_string()))?;
        }
        pci_root
            .lock()
            .unwrap()
            .add_device(
                Bdf::new(0, 0, 0).expect("00:00.0 is a valid address"),
                host_bridge.clone(),
            )
            .map_err(|e| VmError::PciBus("host bridge", e))?;
        let bars = add_bar_windows(cli, &mut io_mgr)?;
        let acpi_cfg = acpi_config(cli);
        let acpi_hotplug = add_acpi_hotplug(&vm, &acpi_cfg, &mut io_mgr)?;
        // What the guest's _OSC asked for and got.
        let osc_report = Arc::new(Mutex::new(OscReport::new()));
        register_pio(
            &mut io_mgr,
            OSC_REPORT_PORT,
            OSC_REPORT_PORTS,
            osc_report.clone(),
        )?;
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let topology = hotplug_topology(cli);
        let pci = Arc::new(
            PciDevices::new(
                vm.clone(),
                GuestMemoryAtomic::new(mem.clone()),
                pci_root.clone(),
                bars,
                router,
                (MMIO32_START, MMIO32_SIZE),
                u16::from(cli.cpus),
                (&topology, cli.no_command_completed),
            )?
            .with_acpi_hotplug(acpi_hotplug)
            .with_osc_report(osc_report)
            .with_aio(cli.aio),
        );
        let (control, now) = match state {
            None => (
                cold_plug_disks(cli, &pci, topology, images)?,
                std::time::Duration::ZERO,
            ),
            Some(state) => {
                if state.hotplug.control.topology() != &topology {
                    return Err(VmError::Restore(
                        "the snapshot's hot-plug topology is not this machine's".into(),
                    ));
                }
                pci.restore(&state.pci, disk_files)
                    .map_err(VmError::Restore)?;
                // The policies are this VMM's command line's, not the source's.
                let mut control = state.hotplug.control.clone();
                control.set_options(hotplug_options(cli));
                (control, state.hotplug.now)
            }
        };
        let handler: Arc<dyn BarReprogrammingHandler> = pci.clone();
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(
            pci_root.clone(),
            Some(handler.clone()),
        )));
        if let Some(s) = state {
            lock(&config_io).restore_config_address(s.platform.config_address);
        }
        register_pio(
            &mut io_mgr,
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_SIZE,
            config_io.clone(),
        )?;
        let ecam = PciConfigMmio::new(pci_root.clone(), ECAM_BUSES, Some(handler));
        io_mgr
            .register_mmio(
                MmioRange::new(MmioAddress(ECAM_START), ecam.size())
                    .map_err(|e| VmError::Bus("ECAM".into(), e))?,
                Arc::new(Mutex::new(ecam)),
            )
            .map_err(|e| VmError::Bus("ECAM".into(), e))?;

        // Firmware tables and the kernel: a restored guest has them in its memory already.
        let entry = match loading {
            Some(kernel) => {
                load_firmware(&mem, &acpi_cfg)?;
                Some(kernel.finish()?)
            }
            None => None,
        };

        // Hot-plug (it also follows guest-initiated removals, socket or not).
        let hotplug = Arc::new(
            Hotplug::start_at(pci.clone(), shared.events.clone(), control, now, node_files)
                .map_err(|e| VmError::Io("hotplug thread", e))?,
        );

        let io = Arc::new(RwLock::new(io_mgr));
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::KvmIoctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..cli.cpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VCPU", e))?;
            let boot = entry.filter(|_| id == 0);
            vcpus.push(Vcpu::new(
                fd,
                id,
                cli.cpus,
                &cpuid,
                boot,
                mem.clone(),
                io.clone(),
                exit.clone(),
            )?);
        }
        let msrs = match vcpus.first() {
            Some(v) => crate::vcpu_state::saveable_msrs(&kvm, v.fd())
                .map_err(|e| VmError::Restore(e.to_string()))?,
            None => Vec::new(),
        };
        if let Some(s) = state {
            if s.vcpus.len() != vcpus.len() {
                return Err(VmError::Restore(format!(
                    "the snapshot has {} vCPUs, this machine {}",
                    s.vcpus.len(),
                    vcpus.len()
                )));
            }
            for (i, (v, saved)) in vcpus.iter().zip(&s.vcpus).enumerate() {
                saved
                    .restore(v.fd())
                    .map_err(|e| VmError::Restore(format!("vCPU {i}: {e}")))?;
            }
            crate::runtime::restore_kvm(&vm, s).map_err(VmError::Restore)?;
        }

        let runtime = Arc::new(Runtime {
            vm,
            vcpus: Arc::new(VcpuSet::new(true)),
            memory: mem,
            platform: Platform {
                serial,
                power,
                config_io,
                host_bridge,
            },
            pci,
            hotplug,
            machine: machine_config(cli),
            shared,
        });
        Ok(Machine {
            runtime,
            drained,
            vcpus,
            msrs: Arc::new(msrs),
            restored: state.map(|s| s.running),
            stdio: cli.serial == SerialMode::Stdio,
        })
    }

    /// Starts the vCPUs and serves the console and the exit signal until the VM stops. The
    /// source of a restored machine is told it was restored once the vCPUs exist.
    fn run(self, qmp: Option<crate::qmp::QmpServer>, answer: Answer) -> Result<VmExit, VmError> {
        let Machine {
            runtime,
            drained,
            vcpus,
            msrs,
            restored,
            stdio,
        } = self;
        let exit = runtime.shared.exit.clone();
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new()
                .map_err(|e| VmError::Io("epoll", io::Error::other(format!("{e:?}"))))?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
        if stdio {
            let tty = crate::terminal::stdin_is_tty();
            em.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                runtime.platform.serial.clone(),
                drained,
                exit.clone(),
                tty,
            ))));
        }

        // A signal that only interrupts KVM_RUN, to kick vCPUs out of the guest.
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| VmError::Io("signal handler", io::Error::from_raw_os_error(e.errno())))?;
        let set = runtime.vcpus.clone();
        let mut threads = Vec::new();
        for vcpu in vcpus {
            let t = vcpu
                .spawn(&set, msrs.clone())
                .map_err(|e| VmError::Io("spawning a vCPU thread", e))?;
            threads.push(t);
        }
        // The vCPUs start parked; the run state says whether they go.
        match restored {
            None => {
                if runtime.shared.run().is_running() {
                    runtime.resume_machine();
                } else {
                    runtime.pause_machine();
                }
            }
            Some(source_ran) => {
                let mut run = runtime.shared.run();
                let effect = run.incoming_done(source_ran);
                runtime.apply(effect);
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                log::info!(
                    "restored: vCPUs {} {:.1} ms after the VMM started (unix time {}.{:06})",
                    if run.is_running() {
                        "running"
                    } else {
                        "ready, paused"
                    },
                    crate::STARTED
                        .get()
                        .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3),
                    wall.as_secs(),
                    wall.subsec_micros()
                );
            }
        }
        answer.send(Ok(()));
        if let Some(ms) = std::env::var(crate::vcpu::SAMPLE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let tids: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
            std::thread::spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(ms.max(10)));
                for &tid in &tids {
                    // SAFETY: the vCPU threads never exit before the process does, so the handles
                    // stay valid; SIGRTMIN has a no-op handler installed above.
                    unsafe { libc::pthread_kill(tid, SIGRTMIN()) };
                }
            });
        }

        while !exit.is_requested() {
            if let Err(e) = em.run() {
                log::warn!("event loop: {e:?}");
            }
        }
        drop(qmp);
        runtime.hotplug.stop();
        runtime.pci.shutdown();
        Ok(exit.reason().unwrap_or(VmExit::Quit))
    }
}

/// What `Machine::build_with` starts from.
enum Start {
    /// A boot, with the `--disk` images opened.
    Boot(Vec<Disk>),
    /// A snapshot's or migration's state.
    Restore(Box<Restore>),
}

/// A machine's state and its backends' files, from a snapshot or migration.
type Restore = (
    crate::snapshot::MachineState,
    std::collections::BTreeMap<String, File>,
    std::collections::BTreeMap<String, File>,
);

/// Writes the ACPI tables and the MP table.
fn load_firmware(mem: &GuestRam, acpi_cfg: &acpi::MachineConfig) -> Result<(), VmError> {
    // ACPI tables.
    for (addr, blob) in acpi::build_tables(acpi_cfg, ACPI_START)? {
        mem.write_slice(&blob, GuestAddress(addr))
            .map_err(|source| VmError::GuestWrite {
                what: "the ACPI tables",
                addr,
                source,
            })?;
    }

    // MP table: ignored by Linux next to the MADT, but it ends Linux's slow scan of the BIOS area.
    let mp = crate::mptable::build(
        &crate::mptable::MpConfig {
            cpus: acpi_cfg.cpus,
            ioapic_id: acpi_cfg.ioapic_id,
            ioapic_addr: acpi_cfg.ioapic_addr,
            lapic_addr: acpi_cfg.lapic_addr,
        },
        MPTABLE_START as u32,
    );
    mem.write_slice(&mp, GuestAddress(MPTABLE_START))
        .map_err(|source| VmError::GuestWrite {
            what: "the MP table",
            addr: MPTABLE_START,
            source,
        })?;

    Ok(())
}

/// The kernel and initramfs being copied into guest memory, on a thread of their own.
struct KernelLoad(std::thread::JoinHandle<Result<boot::BootEntry, VmError>>);

impl KernelLoad {
    /// Starts loading what `cli` names into `mem`.
    fn start(cli: &Cli, mem: &GuestRam) -> Result<Self, VmError> {
        let kernel = cli.kernel.clone().ok_or_else(|| {
            boot::BootError::KernelOpen("--kernel".into(), io::Error::from(io::ErrorKind::NotFound))
        })?;
        let (mem, ram, initramfs, cmdline) = (
            mem.clone(),
            cli.memory,
            cli.initramfs.clone(),
            cli.cmdline.clone(),
        );
        std::thread::Builder::new()
            .name("load-kernel".into())
            .spawn(move || {
                let entry = boot::load_guest(&mem, ram, &kernel, initramfs.as_deref(), &cmdline)?;
                log::info!("boot entry: {entry:x?}");
                Ok(entry)
            })
            .map(KernelLoad)
            .map_err(|e| VmError::Io("spawning the kernel loader", e))
    }

    /// Waits for the load: the boot vCPU's entry.
    fn finish(self) -> Result<boot::BootEntry, VmError> {
        self.0
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// The 16550 console on `SERIAL_PORT` (IRQ 4 through an irqfd), writing where `cli.serial`
/// says; also returns the eventfd it signals when its input FIFO drains.
fn add_console(
    cli: &Cli,
    vm: &VmFd,
    io_mgr: &mut IoManager,
    state: Option<&SerialDeviceState>,
) -> Result<(Arc<Mutex<SerialDevice>>, EventFd), VmError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| VmError::KvmIoctl("KVM_IRQFD", e))?;
    let out: Box<dyn Write + Send> = match &cli.serial {
        SerialMode::Stdio => Box::new(Unbuffered(io::stdout())),
        SerialMode::Null => Box::new(io::sink()),
        SerialMode::File(p) => Box::new(Unbuffered(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmError::SerialFile(p.display().to_string(), e))?,
        )),
    };
    let drained = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
    let notifier = EventFdNotifier(drained.try_clone().map_err(|e| VmError::Io("eventfd", e))?);
    let irq = Arc::new(IrqfdLine(serial_irq));
    let serial = Arc::new(Mutex::new(match state {
        Some(state) => SerialDevice::restored(irq, out, Some(Box::new(notifier)), state)
            .map_err(|e| VmError::Restore(e.to_string()))?,
        None => SerialDevice::with_drain_notifier(irq, out, Some(Box::new(notifier))),
    }));
    register_pio(io_mgr, SERIAL_PORT, SERIAL_PORT_SIZE, serial.clone())?;

    Ok((serial, drained))
}

/// The BAR space over the host bridge's 32- and 64-bit MMIO windows and its I/O window.
fn add_bar_windows(cli: &Cli, io_mgr: &mut IoManager) -> Result<Arc<BarSpace>, VmError> {
    // BARs live in a space of their own over the host bridge's windows, so that a configuration
    // write can move them while the vCPU dispatching it holds the main bus.
    let bars = Arc::new(BarSpace::new());
    for (start, size) in [
        (MMIO32_START, MMIO32_SIZE),
        (mmio64_start(cli.memory), MMIO64_SIZE),
    ] {
        io_mgr
            .register_mmio(
                MmioRange::new(MmioAddress(start), size)
                    .map_err(|e| VmError::Bus(format!("BAR window at {start:#x}"), e))?,
                bars.clone(),
            )
            .map_err(|e| VmError::Bus(format!("BAR window at {start:#x}"), e))?;
    }
    let (io_start, io_end) = PCI_IO_WINDOW;
    io_mgr
        .register_pio(
            PioRange::new(PioAddress(io_start), io_end - io_start)
                .map_err(|e| VmError::Bus("I/O BAR window".into(), e))?,
            bars.clone(),
        )
        .map_err(|e| VmError::Bus("I/O BAR window".into(), e))?;
    Ok(bars)
}

/// The ACPI hot-plug controller's register block, raising the Generic Event Device's GSI.
fn add_acpi_hotplug(
    vm: &VmFd,
    acpi_cfg: &acpi::MachineConfig,
    io_mgr: &mut IoManager,
) -> Result<Arc<Mutex<AcpiHotplugController>>, VmError> {
    // ACPI hot-plug of the root bus's slots: its register block and the GED interrupt.
    let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
    vm.register_irqfd(&ged_irq, GED_GSI)
        .map_err(|e| VmError::KvmIoctl("KVM_IRQFD", e))?;
    let masks = acpi_cfg
        .pci_hotplug
        .as_ref()
        .map(|hp| hp.hotpluggable_masks())
        .unwrap_or_default();
    // The same buses as the control plane's topology (checked in the tests).
    let acpi_hotplug = Arc::new(Mutex::new(AcpiHotplugController::new(
        &masks,
        Arc::new(IrqfdLine(ged_irq)),
    )));
    if crate::trace::enabled() {
        acpi_hotplug
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_tracer(Some(Arc::new(crate::trace::TraceRegisters)));
    }
    register_pio(
        io_mgr,
        ACPI_HOTPLUG_PORT,
        ACPI_HOTPLUG_PORTS,
        acpi_hotplug.clone(),
    )?;
    Ok(acpi_hotplug)
}

/// The control plane's policies of the command line (`--unplug-stall-timeout`, `--surprise-*`,
/// `--backend-error`).
fn hotplug_options(cli: &Cli) -> HotplugOptions {
    HotplugOptions {
        stall_after: std::time::Duration::from_secs(cli.unplug_stall_timeout),
        surprise: SurprisePolicy {
            in_flight: cli.surprise_in_flight,
            bar_reads: cli.surprise_bar_reads,
        },
        remove_on_backend_error: cli.remove_on_backend_error,
        ..HotplugOptions::default()
    }
}

/// The hot-plug control plane, knowing every `--disk` from the start, and the disks plugged
/// with their `images` (one per `--disk`, in order, as `check_user_input` opened them).
fn cold_plug_disks(
    cli: &Cli,
    pci: &PciDevices,
    topology: Topology,
    images: Vec<Disk>,
) -> Result<HotplugControl, VmError> {
    let mut control = HotplugControl::new(topology, hotplug_options(cli));
    let mut next_root_slot = FIRST_ROOT_BUS_SLOT;
    debug_assert_eq!(images.len(), cli.disk.len());
    for (i, (d, image)) in cli.disk.iter().zip(images).enumerate() {
        let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let slot = match d.bus.parse::<BusId>() {
            Ok(BusId::Port(n)) if n < cli.root_ports => SlotId::Port(n),
            _ if next_root_slot < FIRST_ROOT_PORT_SLOT => {
                next_root_slot += 1;
                SlotId::RootBus(next_root_slot - 1)
            }
            _ => return Err(ConfigError::NoRootBusSlot(id).into()),
        };
        let key = control
            .cold_plug(&id, slot, d.path.clone(), d.readonly)
            .map_err(|source| VmError::ColdPlug {
                id: id.clone(),
                source,
            })?;
        let placement = pci.slot_placement(slot).ok_or_else(|| VmError::ColdPlug {
            id: id.clone(),
            source: devices::hotplug::HotplugError::NoSuchBus(slot.bus()),
        })?;
        let disk = DiskSpec {
            key,
            id,
            path: d.path.clone(),
            readonly: d.readonly,
            format: d.format,
            image: DiskImage::Opened(image),
            node: None,
        };
        pci.plug_disk(disk, placement, false)?;
    }
    Ok(control)
}

fn register_pio<D>(
    io: &mut IoManager,
    base: u16,
    size: u16,
    dev: Arc<Mutex<D>>,
) -> Result<(), VmError>
where
    D: vm_device::MutDevicePio + Send + 'static,
{
    let range = PioRange::new(PioAddress(base), size)
        .map_err(|e| VmError::Bus(format!("ports {base:#x}+{size}"), e))?;
    io.register_pio(range, dev)
        .map_err(|e| VmError::Bus(format!("ports {base:#x}+{size}"), e))
}

/// Fresh (zero) guest RAM of `size` bytes, in the machine's RAM regions.
fn create_memory(size: u64) -> Result<GuestRam, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestRam::from_ranges(&ranges).map_err(|e| VmError::Memory(size >> 20, e.to_string()))
}

/// The machine's hot-plug places: its root ports in their modes, and the root bus's ACPI
/// hot-plug slots.
fn hotplug_topology(cli: &Cli) -> Topology {
    let modes: Vec<PortMode> = (0..cli.root_ports)
        .map(|n| cli.root_port_hotplug.mode(n))
        .collect();
    Topology::new(&modes, true)
}

fn acpi_config(cli: &Cli) -> acpi::MachineConfig {
    acpi::MachineConfig {
        cpus: cli.cpus,
        lapic_addr: LAPIC_START as u32,
        ioapic_addr: IOAPIC_START as u32,
        ioapic_id: cli.cpus,
        sci_irq: SCI_IRQ,
        sleep_control_port: POWER_PORT + SLEEP_CONTROL_OFFSET,
        sleep_status_port: POWER_PORT + SLEEP_STATUS_OFFSET,
        reset_port: POWER_PORT + RESET_OFFSET,
        reset_value: RESET_VALUE,
        serial: Some((SERIAL_PORT, SERIAL_IRQ)),
        pci: acpi::HostBridgeConfig {
            segment: 0,
            ecam_base: ECAM_START,
            bus_start: 0,
            bus_end: (ECAM_BUSES - 1) as u8,
            io_window: PCI_IO_WINDOW,
            mmio32: (MMIO32_START, MMIO32_SIZE),
            mmio64: (mmio64_start(cli.memory), MMIO64_SIZE),
            osc: acpi::OscConfig {
                grant_native_hotplug: cli.osc_native_hotplug,
                report_port: Some(OSC_REPORT_PORT),
            },
        },
        pci_hotplug: Some(acpi::PciHotplugConfig {
            port: ACPI_HOTPLUG_PORT,
            gsi: GED_GSI,
            // The buses in bus select order, as the controller numbers them.
            buses: hotplug_topology(cli)
                .acpi_buses()
                .into_iter()
                .map(|b| acpi::AcpiHotplugBus {
                    parent: match b.bus {
                        BusId::RootBus => acpi::SlotParent::RootBus,
                        BusId::Port(n) => acpi::SlotParent::RootPort {
                            index: n,
                            device: FIRST_ROOT_PORT_SLOT + n,
                            function: 0,
                        },
                    },
                    slots: b
                        .slots
                        .iter()
                        .map(|s| acpi::AcpiSlot {
                            device: s.device(),
                            sun: s.number(),
                        })
                        .collect(),
                })
                .collect(),
        }),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_disk_is_opened_before_the_boot_and_that_file_is_the_one_plugged() {
        use clap::Parser;
        use std::os::unix::fs::MetadataExt;
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let a = dir.as_path().join("a.img");
        let b = dir.as_path().join("b.img");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        std::fs::write(&b, vec![0u8; 8192]).unwrap();
        let disk = |p: &std::path::Path, more: &str| format!("path={}{more}", p.display());
        let cli = Cli::try_parse_from([
            "hotplug-vmm",
            "--kernel",
            "/dev/null",
            "--disk",
            &disk(&a, ",format=raw"),
            "--disk",
            &disk(&b, ",readonly=on"),
        ])
        .unwrap();
        let a_ino = std::fs::metadata(&a).unwrap().ino();
        let images = check_user_input(&cli).unwrap();
        // The name now leads elsewhere: what is plugged is still the file that was checked.
        std::fs::rename(&b, &a).unwrap();
        let [first, second] = &images[..] else {
            panic!("{} images for 2 disks", images.len())
        };
        assert_eq!((first.capacity(), first.readonly()), (8, false));
        assert_eq!(first.metadata().unwrap().ino(), a_ino);
        assert_eq!((second.capacity(), second.readonly()), (16, true));
        assert!(second.probed_raw() && !first.probed_raw());

        // An incoming machine's images are checked by identity when its state arrives.
        let cli = Cli::try_parse_from([
            "hotplug-vmm",
            "--incoming",
            "defer",
            "--disk",
            &disk(&b, ""),
        ])
        .unwrap();
        assert!(check_user_input(&cli).unwrap().is_empty());
    }

    #[test]
    fn acpi_and_power_registers_agree() {
        // The DSDT's _S5 and the FADT's reset value must be what the power device decodes.
        assert_eq!(acpi::fadt::SLP_TYP_S5, devices::power_control::SLP_TYP_S5);
        let cli = <Cli as clap::Parser>::parse_from(["hotplug-vmm", "--kernel", "k"]);
        let cfg = acpi_config(&cli);
        assert_eq!(cfg.reset_value, RESET_VALUE);
        assert_eq!(cfg.sleep_control_port, POWER_PORT);
        assert_eq!(cfg.pci.ecam_base, ECAM_START);
        acpi::build_tables(&cfg, ACPI_START).expect("tables for the default machine");
    }

    #[test]
    fn acpi_hotplug_registers_agree() {
        // The register layout is platform::acpi_hotplug's for both sides; the buses and their
        // slots come from the one Topology, in bus select order.
        let cli = <Cli as clap::Parser>::parse_from(["hotplug-vmm", "--kernel", "k"]);
        let hp = acpi_config(&cli).pci_hotplug.expect("root bus slots");
        assert_eq!(hp.hotpluggable_masks(), [0xfffe]);
        // ACPI-mode root ports follow the root bus, one slot (device 0) each, in port order.
        let cli = <Cli as clap::Parser>::parse_from([
            "hotplug-vmm",
            "--kernel",
            "k",
            "--root-port-hotplug",
            "rp3=acpi,rp1=acpi",
        ]);
        let hp = acpi_config(&cli).pci_hotplug.expect("slots");
        assert_eq!(hp.hotpluggable_masks(), [0xfffe, 1, 1]);
        assert_eq!(
            hp.hotpluggable_masks(),
            hotplug_topology(&cli).acpi_hotpluggable_masks()
        );
        let parents: Vec<_> = hp.buses.iter().map(|b| b.parent.clone()).collect();
        assert_eq!(
            parents[1..],
            [
                acpi::SlotParent::RootPort {
                    index: 1,
                    device: 0x11,
                    function: 0
                },
                acpi::SlotParent::RootPort {
                    index: 3,
                    device: 0x13,
                    function: 0
                },
            ]
        );
        assert_eq!(hp.buses[2].slots[0].sun, 3, "rpN's slot keeps number N");
        acpi::build_tables(&acpi_config(&cli), ACPI_START).expect("tables");
    }

    #[test]
    fn osc_report_registers_agree() {
        let cli = <Cli as clap::Parser>::parse_from(["hotplug-vmm", "--kernel", "k"]);
        let osc = acpi_config(&cli).pci.osc;
        assert_eq!(osc.report_port, Some(OSC_REPORT_PORT));
        assert!(osc.grant_native_hotplug);
        let deny = <Cli as clap::Parser>::parse_from([
            "hotplug-vmm",
            "--kernel",
            "k",
            "--osc-native-hotplug",
            "deny",
        ]);
        assert!(!acpi_config(&deny).pci.osc.grant_native_hotplug);
    }
}
