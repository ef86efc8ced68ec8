//! The PCI devices of the machine and the KVM plumbing they need: BAR mappings (a [`BarSpace`]
//! over the host bridge's windows), ioeventfds on virtio notify addresses that follow BAR moves,
//! MSI-X vectors on irqfds, and MMIO address allocation for BARs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::path::{Path, PathBuf};

use devices::acpi_hotplug::{AcpiHotplugController, AcpiHotplugState};
use devices::osc_report::OscReport;
use devices::pci::root_port::PcieRootPortState;
use devices::pci::{
    same_device, BarReprogram, BarReprogrammingHandler, BarSpace, Bdf, PciDevice, PciRoot,
    PcieRootPort, RootPortOptions, SharedPciDevice, VacatedRegion, VacatedWrites,
};
use devices::virtio::block::{
    AioBackend, BackendErrorObserver, Block, BlockConfig, Disk, ImageFormat,
};
use devices::virtio::pci::{RingIndices, VirtioPciDevice, VirtioPciState, BAR0_SIZE};
use devices::virtio::{GuestMemory, InFlightOutcome, InFlightPolicy};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};

use crate::backend_identity::BackendIdentity;
use serde_json::json;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use devices::hotplug::topology::{FIRST_ROOT_PORT_SLOT, ROOT_BUS_SELECT};
use devices::hotplug::{
    BarReads, BusId, FunctionKey, PortMode, PulledRelease, SlotId, SurprisePolicy, Topology,
};

use crate::interrupts::{GsiRouter, KvmMsiGroup, KvmMsiSink};

/// Size of the memory window the VMM programs into a root port in ACPI mode, as firmware does:
/// Linux sizes a window at boot only for native hot-plug bridges, and acpiphp assigns a hot-added
/// device's BARs from the window its port already has. Linux's own hot-plug reserve is 2 MiB.
pub const ACPI_PORT_MEMORY_WINDOW: u64 = 2 << 20;
/// Where a disk sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the root bus at this address: an ACPI hot-plug slot.
    RootBus(Bdf),
    /// In the slot of root port `port` (e.g. "rp1"), whose own address is `port_bdf`.
    Port { port: String, port_bdf: Bdf },
}

/// The disk to plug: the control plane's key and id for it, its backing file, and that file
/// already opened.
pub struct DiskSpec {
    pub key: FunctionKey,
    pub id: String,
    pub path: std::path::PathBuf,
    pub readonly: bool,
    /// Its format; `None` probes it.
    pub format: Option<ImageFormat>,
    /// Its image, opened by the caller.
    pub image: DiskImage,
    /// The `blockdev-add` node it uses, if any.
    pub node: Option<String>,
}

/// A disk's image as the caller opened it: nothing is opened again by name when it is
/// plugged, so the file plugged is the file that was checked.
pub enum DiskImage {
    /// Opened and read (format, size) already: a `--disk`, checked before the machine is built.
    Opened(Disk),
    /// A clone of a `blockdev-add` node's file, read when plugged.
    File(std::fs::File),
}

/// A virtio-pci function and the notify addresses its ioeventfds are registered on now.
struct VirtioFunction {
    key: FunctionKey,
    device: Arc<Mutex<VirtioPciDevice>>,
    shared: SharedPciDevice,
    path: std::path::PathBuf,
    readonly: bool,
    /// Its image's format, and whether it was probed.
    format: (ImageFormat, bool),
    node: Option<String>,
    placement: Placement,
    /// Where BAR 0 is decoded (and the ioeventfds registered), if it is.
    bar0: Option<u64>,
    /// The MMIO the VMM assigned BAR 0 (cold-plugged root bus devices only; the guest assigns
    /// BARs behind ports and of hot-added devices, as it does on QEMU).
    bar0_range: Option<RangeInclusive>,
    /// Which file it opened, and how big it was (checked when a snapshot is restored).
    identity: BackendIdentity,
    /// Its capacity in sectors, as the guest sees it.
    capacity: u64,
    /// Pulled out and still failing: what its BARs read meanwhile.
    pulled_bar_reads: Option<BarReads>,
    /// Its queue notifications reach it through BAR 0, not ioeventfds: pulled out, it fails
    /// requests on the vCPU that notifies ([`PciDevices::notify_by_bar`]).
    notify_by_bar: bool,
}

/// Where a saved disk sat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedPlacement {
    /// Device `device` of the root bus.
    RootBus(u8),
    /// The slot of root port `port`.
    Port(String),
}

/// A disk of a saved machine: its records and its function's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskState {
    /// The control plane's key.
    pub key: FunctionKey,
    /// Its id.
    pub id: String,
    /// Its image.
    pub path: PathBuf,
    /// Read-only.
    pub readonly: bool,
    /// Its image's format (raw in snapshots older than qcow2 support).
    #[serde(default)]
    pub format: ImageFormat,
    /// Whether that format was probed (`--disk` without `format=`): a restore probes again
    /// and requires the same answer, so that a probed raw image keeps its guarded first
    /// sector.
    #[serde(default)]
    pub format_probed: bool,
    /// The `blockdev-add` node it uses.
    pub node: Option<String>,
    /// Where it sat.
    pub placement: SavedPlacement,
    /// Where BAR 0 was decoded (the ioeventfds' addresses).
    pub bar0: Option<u64>,
    /// The MMIO the VMM had assigned BAR 0, as (start, end).
    pub bar0_range: Option<(u64, u64)>,
    /// Its file.
    pub identity: BackendIdentity,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Pulled out and still failing requests: what its BARs read.
    pub pulled_bar_reads: Option<BarReads>,
    /// The virtio-pci function.
    pub function: VirtioPciState,
}

/// The PCI devices of a saved machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PciDevicesState {
    /// Root ports by id.
    pub root_ports: BTreeMap<String, PcieRootPortState>,
    /// The ACPI hot-plug controller.
    pub acpi_hotplug: Option<AcpiHotplugState>,
    /// The `_OSC` report registers.
    pub osc: Option<OscReport>,
    /// The disks in their slots.
    pub disks: Vec<DiskState>,
    /// The disks pulled out by surprise that still fail their driver's requests.
    pub pulled: Vec<DiskState>,
    /// BARs of pulled-out disks that read zero where nothing else was mapped since.
    pub vacated: Vec<VacatedRegion>,
}

/// Where the disks' backend failures go: set by whoever handles them (the hot-plug worker);
/// failures before that, or after it is cleared, are only logged.
#[derive(Default)]
pub struct BackendErrorHub {
    target: Mutex<Option<BackendErrorTarget>>,
}

/// A handler of backend failures: (disk id, operation, error).
pub type BackendErrorTarget = Box<dyn Fn(&str, &str, &std::io::Error) + Send + Sync>;

impl BackendErrorHub {
    /// Sends every failure to `target` from now on (`None`: only log them).
    pub fn set_target(&self, target: Option<BackendErrorTarget>) {
        *lock(&self.target) = target;
    }
}

/// One disk's link to the hub.
struct DiskBackendErrors {
    id: String,
    hub: Arc<BackendErrorHub>,
}

impl BackendErrorObserver for DiskBackendErrors {
    fn backend_error(&self, operation: &str, error: &std::io::Error) {
        log::warn!(
            "virtio-blk {}: backend {operation} failed: {error}",
            self.id
        );
        if let Some(target) = lock(&self.hub.target).as_ref() {
            target(&self.id, operation, error);
        }
    }
}

/// A root port of the machine: where it is and the device.
pub struct RootPortEntry {
    pub bdf: Bdf,
    pub port: Arc<Mutex<PcieRootPort>>,
    /// In ACPI mode: the ACPI hot-plug controller's bus select value for its slot (its device 0).
    pub acpi_select: Option<u8>,
}

/// The PCI devices of one segment.
pub struct PciDevices {
    vm: Arc<VmFd>,
    memory: GuestMemory,
    root: Arc<Mutex<PciRoot>>,
    bars: Arc<BarSpace>,
    router: Arc<GsiRouter>,
    mmio: Mutex<AddressAllocator>,
    /// Disks by id.
    virtio: Mutex<BTreeMap<String, VirtioFunction>>,
    /// Disks pulled out by surprise that go on failing their driver's requests until it
    /// resets them (in-flight policy `fail`); see [`surprise_remove`](Self::surprise_remove).
    pulled: Mutex<Vec<VirtioFunction>>,
    /// Pulled-out disks let go because the guest mapped a BAR over theirs, not yet told to the
    /// control plane.
    evicted: Mutex<Vec<FunctionKey>>,
    /// Root ports by id; hot-add and removal go through their slots.
    root_ports: BTreeMap<String, RootPortEntry>,
    /// The ACPI hot-plug controller of the root bus's slots and the ACPI-mode ports'.
    acpi: Option<Arc<Mutex<AcpiHotplugController>>>,
    /// What the guest's `_OSC` asked for and got.
    osc: Option<Arc<Mutex<OscReport>>>,
    queues_per_disk: u16,
    /// The engine every disk's host I/O runs on.
    aio: AioBackend,
    backend_errors: Arc<BackendErrorHub>,
}

/// A failure to add a device.
#[derive(Debug, thiserror::Error)]
pub enum AddDeviceError {
    #[error("{0}")]
    Block(#[from] devices::virtio::block::BlockError),
    #[error("virtio-pci: {0}")]
    Transport(String),
    #[error("no MMIO space left for {0}'s BAR")]
    NoMmio(String),
    #[error("interrupts for {0}: {1}")]
    Interrupts(String, std::io::Error),
    #[error("{0}")]
    Bus(String),
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    #[error("Bus '{0}' not found")]
    NoSuchBus(String),
    #[error("slot of {port} is occupied by '{occupant}'")]
    SlotOccupied { port: String, occupant: String },
}

impl PciDevices {
    /// Devices on `root`, BARs of root-bus devices allocated from
    /// `[mmio_base, mmio_base + mmio_size)`, and the root ports (rp0..) of `topology` at
    /// 00:10.0 and up. Native ones advertise No Command Completed Support if
    /// `no_command_completed`; ACPI ones get their ACPI hot-plug bus select from `topology`
    /// and a memory window of [`ACPI_PORT_MEMORY_WINDOW`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Arc<VmFd>,
        memory: GuestMemory,
        root: Arc<Mutex<PciRoot>>,
        bars: Arc<BarSpace>,
        router: Arc<GsiRouter>,
        (mmio_base, mmio_size): (u64, u64),
        queues_per_disk: u16,
        (topology, no_command_completed): (&Topology, bool),
    ) -> Result<Self, AddDeviceError> {
        let mut mmio = AddressAllocator::new(mmio_base, mmio_size)
            .map_err(|e| AddDeviceError::Bus(format!("MMIO window: {e}")))?;
        let mut ports = BTreeMap::new();
        for n in 0..topology.port_count() {
            let mode = topology.port_mode(n).unwrap_or_default();
            let id = format!("rp{n}");
            let bdf = FIRST_ROOT_PORT_SLOT
                .checked_add(n)
                .and_then(|d| Bdf::new(0, d, 0))
                .ok_or_else(|| AddDeviceError::Bus(format!("no slot for root port {id}")))?;
            let port =
                Self::make_root_port(&router, &id, u16::from(n), mode, no_command_completed)?;
            let acpi_select = match mode {
                PortMode::Native => None,
                PortMode::Acpi => {
                    let window = mmio
                        .allocate(
                            ACPI_PORT_MEMORY_WINDOW,
                            ACPI_PORT_MEMORY_WINDOW,
                            AllocPolicy::FirstMatch,
                        )
                        .map_err(|_| AddDeviceError::NoMmio(id.clone()))?;
                    // A bridge's non-prefetchable window holds 32-bit addresses only.
                    let (Ok(base), Ok(limit)) =
                        (u32::try_from(window.start()), u32::try_from(window.end()))
                    else {
                        return Err(AddDeviceError::NoMmio(id));
                    };
                    lock(&port).set_memory_window(base, limit);
                    topology
                        .acpi_select(SlotId::Port(n))
                        .map(|(select, _)| select)
                }
            };
            let shared: SharedPciDevice = port.clone();
            lock(&root)
                .add_device(bdf, shared)
                .map_err(|e| AddDeviceError::Bus(format!("{bdf}: {e}")))?;
            log::info!(
                "{bdf}: PCIe root port {id} (slot {n}, {} hot-plug)",
                mode.name()
            );
            ports.insert(
                id,
                RootPortEntry {
                    bdf,
                    port,
                    acpi_select,
                },
            );
        }
        Ok(PciDevices {
            vm,
            memory,
            root,
            bars,
            router,
            mmio: Mutex::new(mmio),
            virtio: Mutex::new(BTreeMap::new()),
            pulled: Mutex::new(Vec::new()),
            evicted: Mutex::new(Vec::new()),
            root_ports: ports,
            acpi: None,
            osc: None,
            queues_per_disk,
            aio: AioBackend::Auto,
            backend_errors: Arc::default(),
        })
    }

    /// Lets `controller` (whose bus [`ROOT_BUS_SELECT`] is the root bus) hot-plug the root bus's
    /// slots.
    pub fn with_acpi_hotplug(mut self, controller: Arc<Mutex<AcpiHotplugController>>) -> Self {
        self.acpi = Some(controller);
        self
    }

    /// Where the disks' backend failures go.
    pub fn backend_errors(&self) -> &BackendErrorHub {
        &self.backend_errors
    }

    /// Lets the control socket show what the guest's `_OSC` reported to `report`.
    pub fn with_osc_report(mut self, report: Arc<Mutex<OscReport>>) -> Self {
        self.osc = Some(report);
        self
    }

    /// Runs every disk's host I/O on `aio` (from the next disk made).
    pub fn with_aio(mut self, aio: AioBackend) -> Self {
        self.aio = aio;
        self
    }

    /// The `_OSC` report registers, if the machine has them.
    pub fn osc_report(&self) -> Option<&Arc<Mutex<OscReport>>> {
        self.osc.as_ref()
    }

    /// The ACPI hot-plug controller, if the machine has one.
    pub fn acpi_hotplug(&self) -> Option<&Arc<Mutex<AcpiHotplugController>>> {
        self.acpi.as_ref()
    }

    /// Takes the function at device `device` of the root bus off the bus (its configuration
    /// space reads all-ones from now on), leaving the rest of its removal to
    /// [`unplug`](Self::unplug). Locks only the bus: callable while the ACPI hot-plug controller
    /// is locked.
    pub fn hide_root_bus_device(&self, device: u8) {
        if let Some(bdf) = Bdf::new(0, device, 0) {
            if device != 0 && device < FIRST_ROOT_PORT_SLOT {
                let _ = lock(&self.root).remove_device(bdf);
            }
        }
    }

    /// Takes the function in the slot of the ACPI-mode root port with bus select `select` off
    /// its bus (see [`hide_root_bus_device`](Self::hide_root_bus_device)).
    pub fn hide_port_device(&self, select: u8) {
        if let Some(entry) = self.port_by_select(select) {
            let _ = lock(&self.root).remove_downstream_device(entry.1.bdf, 0);
        }
    }

    /// The ACPI hot-plug slot at `placement`, as (bus select, device number): a slot of the
    /// root bus, or the slot of a root port in ACPI mode; `None` for a native port.
    pub fn acpi_slot(&self, placement: &Placement) -> Option<(u8, u8)> {
        match placement {
            Placement::RootBus(bdf) => Some((ROOT_BUS_SELECT, bdf.device())),
            Placement::Port { port, .. } => Some((self.root_ports.get(port)?.acpi_select?, 0)),
        }
    }

    /// The ACPI-mode root port with ACPI hot-plug bus select `select`: its id and entry.
    pub fn port_by_select(&self, select: u8) -> Option<(&String, &RootPortEntry)> {
        self.root_ports
            .iter()
            .find(|(_, e)| e.acpi_select == Some(select))
    }

    /// The id of the disk at device `device` of the root bus, if any.
    pub fn root_bus_occupant(&self, device: u8) -> Option<String> {
        lock(&self.virtio)
            .iter()
            .find(|(_, f)| matches!(f.placement, Placement::RootBus(b) if b.device() == device))
            .map(|(id, _)| id.clone())
    }

    fn make_root_port(
        router: &Arc<GsiRouter>,
        id: &str,
        slot_number: u16,
        mode: PortMode,
        no_command_completed: bool,
    ) -> Result<Arc<Mutex<PcieRootPort>>, AddDeviceError> {
        let msi = KvmMsiGroup::new(router.clone(), 1)
            .map_err(|e| AddDeviceError::Interrupts(id.to_string(), e))?;
        let options = RootPortOptions {
            port_number: u8::try_from(slot_number).unwrap_or(0),
            no_command_completed,
            native_hotplug: mode == PortMode::Native,
        };
        let mut port = PcieRootPort::new(id, slot_number, options, Arc::new(KvmMsiSink(msi)));
        if crate::trace::enabled() {
            port.set_tracer(Some(Arc::new(crate::trace::TraceRegisters)));
        }
        Ok(Arc::new(Mutex::new(port)))
    }

    /// Root port rp`n`.
    pub fn port(&self, n: u8) -> Option<&RootPortEntry> {
        self.root_ports.get(&BusId::Port(n).to_string())
    }

    /// Where a disk in `slot` sits, if the machine has the slot.
    pub fn slot_placement(&self, slot: SlotId) -> Option<Placement> {
        match slot {
            SlotId::RootBus(d) => Bdf::new(0, d, 0).map(Placement::RootBus),
            SlotId::Port(n) => Some(Placement::Port {
                port: BusId::Port(n).to_string(),
                port_bdf: self.port(n)?.bdf,
            }),
        }
    }

    /// Every root port, by id.
    pub fn root_ports(&self) -> impl Iterator<Item = (&String, &RootPortEntry)> {
        self.root_ports.iter()
    }

    /// The id of the disk in root port `port`'s slot, if any.
    pub fn port_occupant(&self, port: &str) -> Option<String> {
        lock(&self.virtio)
            .iter()
            .find(|(_, f)| matches!(&f.placement, Placement::Port { port: p, .. } if p == port))
            .map(|(id, _)| id.clone())
    }

    /// Adds a virtio-blk disk. On the root bus its BAR 0 is assigned (the guest may move it);
    /// in a root port's slot the guest assigns it. `hot` inserts the card into the slot as a
    /// hot-add (presence and link change, an interrupt if the guest enabled it); otherwise the
    /// card is there from power-on.
    pub fn plug_disk(
        &self,
        disk: DiskSpec,
        placement: Placement,
        hot: bool,
    ) -> Result<(), AddDeviceError> {
        let id = disk.id.clone();
        if lock(&self.virtio).contains_key(&id) {
            return Err(AddDeviceError::DuplicateId(id));
        }
        if let Placement::Port { port, .. } = &placement {
            let entry = self
                .root_ports
                .get(port)
                .ok_or_else(|| AddDeviceError::NoSuchBus(port.clone()))?;
            if let Some(occupant) = self.port_occupant(port) {
                return Err(AddDeviceError::SlotOccupied {
                    port: port.clone(),
                    occupant,
                });
            }
            if lock(&entry.port).slot().is_present() {
                return Err(AddDeviceError::SlotOccupied {
                    port: port.clone(),
                    occupant: "a card being removed".to_string(),
                });
            }
        }
        let config = self.block_config(&disk.path, &id, disk.readonly, disk.format);
        let (block, identity) = match disk.image {
            DiskImage::File(file) => {
                let identity = BackendIdentity::of(&file);
                (Block::with_file(config, file)?, identity)
            }
            DiskImage::Opened(image) => {
                let identity = BackendIdentity::of_disk(&image);
                (Block::with_disk(config, image)?, identity)
            }
        };
        let identity = identity.map_err(|e| AddDeviceError::Transport(format!("{id}: {e}")))?;
        let capacity = block.capacity();
        let format = (block.format(), block.format_probed());
        let mut dev = self.virtio_function(&id, block)?;
        if let Placement::RootBus(bdf) = &placement {
            if let Some(occupant) = self.root_bus_occupant(bdf.device()) {
                return Err(AddDeviceError::SlotOccupied {
                    port: format!("pcie.0 slot {}", bdf.device()),
                    occupant,
                });
            }
            if hot {
                let acpi = self.acpi.as_ref().ok_or_else(|| {
                    AddDeviceError::Bus("pcie.0 has no hot-plug controller".to_string())
                })?;
                let c = lock(acpi);
                let state = c.bus(ROOT_BUS_SELECT);
                if state.is_none_or(|s| s.hotpluggable & 1 << bdf.device() == 0) {
                    return Err(AddDeviceError::Bus(format!(
                        "device {} of pcie.0 is not a hot-plug slot",
                        bdf.device()
                    )));
                }
                if state.is_some_and(|s| s.occupied & 1 << bdf.device() != 0) {
                    return Err(AddDeviceError::SlotOccupied {
                        port: format!("pcie.0 slot {}", bdf.device()),
                        occupant: "a device being removed".to_string(),
                    });
                }
            }
        }
        let mut bar0_range = None;
        if let (Placement::RootBus(_), false) = (&placement, hot) {
            let bar = dev
                .config()
                .bar(0)
                .ok_or_else(|| AddDeviceError::Transport(format!("{id}: no BAR 0")))?;
            let range = lock(&self.mmio)
                .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
                .map_err(|_| AddDeviceError::NoMmio(id.clone()))?;
            if let Err(e) = dev.config_mut().set_bar_address(0, range.start()) {
                let _ = lock(&self.mmio).free(&range);
                return Err(AddDeviceError::Transport(format!("{id}: {e}")));
            }
            bar0_range = Some(range);
        }
        let dev = Arc::new(Mutex::new(dev));
        let shared: SharedPciDevice = dev.clone();
        let added = match &placement {
            Placement::RootBus(bdf) => lock(&self.root).add_device(*bdf, shared.clone()),
            Placement::Port { port_bdf, .. } => {
                lock(&self.root).add_downstream_device(*port_bdf, 0, shared.clone())
            }
        };
        if let Err(e) = added {
            if let Some(range) = &bar0_range {
                let _ = lock(&self.mmio).free(range);
            }
            lock(&dev).shutdown();
            return Err(AddDeviceError::Bus(format!("{id}: {e}")));
        }
        lock(&self.virtio).insert(
            id.clone(),
            VirtioFunction {
                key: disk.key,
                device: dev,
                shared,
                path: disk.path.clone(),
                readonly: disk.readonly,
                format,
                node: disk.node,
                placement: placement.clone(),
                bar0: None,
                bar0_range,
                identity,
                capacity,
                pulled_bar_reads: None,
                notify_by_bar: false,
            },
        );
        match &placement {
            Placement::RootBus(bdf) => {
                if let Some(acpi) = &self.acpi {
                    let mut c = lock(acpi);
                    let result = if hot {
                        c.insert(ROOT_BUS_SELECT, bdf.device())
                    } else {
                        c.cold_plug(ROOT_BUS_SELECT, bdf.device())
                    };
                    drop(c);
                    match result {
                        Ok(()) => {}
                        // A cold-plugged device outside the hot-plug slots just stays.
                        Err(_) if !hot => {}
                        Err(e) => {
                            let _ = self.unplug(&id);
                            return Err(AddDeviceError::Bus(e.to_string()));
                        }
                    }
                }
                if hot {
                    crate::trace::slot(
                        "pcie.0",
                        "card-inserted",
                        json!(format!("{:02x}.0", bdf.device())),
                        Some(id.as_str()),
                    );
                }
                log::info!(
                    "{bdf}: virtio-blk {id} ({}) {}",
                    disk.path.display(),
                    if hot {
                        "hot-added"
                    } else {
                        "present at power-on"
                    }
                )
            }
            Placement::Port { port, .. } => {
                let entry = &self.root_ports[port];
                let result = if hot {
                    lock(&entry.port).insert_card()
                } else {
                    lock(&entry.port).cold_plug_card()
                };
                // In ACPI mode the card is also announced to acpiphp (a Device Check).
                let result = result.map_err(|e| e.to_string()).and_then(|()| {
                    match (entry.acpi_select, &self.acpi) {
                        (Some(select), Some(acpi)) => {
                            let mut c = lock(acpi);
                            if hot {
                                c.insert(select, 0)
                            } else {
                                c.cold_plug(select, 0)
                            }
                            .map_err(|e| e.to_string())
                        }
                        _ => Ok(()),
                    }
                });
                if let Err(e) = result {
                    // Checked above under the same conditions; undo rather than leave a half-added card.
                    let _ = self.unplug(&id);
                    return Err(AddDeviceError::Bus(format!("{port}: {e}")));
                }
                if hot {
                    crate::trace::slot(port, "card-inserted", json!("00.0"), Some(id.as_str()));
                }
                log::info!(
                    "{port}: virtio-blk {id} ({}) {}",
                    disk.path.display(),
                    if hot {
                        "hot-added"
                    } else {
                        "present at power-on"
                    }
                );
            }
        }
        Ok(())
    }

    /// The configuration of disk `id` on `path` in `format` (probed if `None`): one queue per
    /// vCPU.
    fn block_config(
        &self,
        path: &Path,
        id: &str,
        readonly: bool,
        format: Option<ImageFormat>,
    ) -> BlockConfig {
        let mut config = BlockConfig::new(path, id);
        config.readonly = readonly;
        config.format = format;
        config.num_queues = self.queues_per_disk.max(1);
        config.aio = self.aio;
        config
    }

    /// `block` as a virtio-pci function: its backend failures reported to the hub, its MSI-X
    /// vectors on irqfds.
    fn virtio_function(
        &self,
        id: &str,
        mut block: Block,
    ) -> Result<VirtioPciDevice, AddDeviceError> {
        block.set_backend_error_observer(Some(Arc::new(DiskBackendErrors {
            id: id.to_string(),
            hub: self.backend_errors.clone(),
        })));
        let vectors = VirtioPciDevice::msix_vector_count(&block);
        let msi = KvmMsiGroup::new(self.router.clone(), vectors)
            .map_err(|e| AddDeviceError::Interrupts(id.to_string(), e))?;
        VirtioPciDevice::new(Box::new(block), self.memory.clone(), Arc::new(msi))
            .map_err(|e| AddDeviceError::Transport(format!("{id}: {e}")))
    }

    /// Takes disk `id` away after the guest let go of it: off the bus (its configuration
    /// space reads all-ones), BARs and ioeventfds unmapped, I/O thread stopped, backend
    /// released, MSI routes freed. A card in a root port's slot is taken out of the slot
    /// (presence changes, an interrupt if enabled). Returns false if there is no disk `id`.
    pub fn unplug(&self, id: &str) -> bool {
        self.take_away(id, None, BarReads::AllOnes).is_some()
    }

    /// Pulls disk `id` out without asking the guest: the requests in flight are failed or
    /// dropped as `in_flight` says (failed ones complete, with their interrupts, before the
    /// device vanishes), then the device vanishes as in [`unplug`](Self::unplug) — config
    /// space all-ones, BARs reading as `bar_reads` says — and the slot reports it:
    /// presence and link lost on a native slot, a bus check latched on an ACPI one. The
    /// backend is released once the host I/O in flight has finished.
    ///
    /// With `fail` the device goes on failing every request its driver submits, with the
    /// interrupt, until the driver resets it (its write of 0 to `device_status` still reaches
    /// the device through the vacated BAR): the driver learns of the removal only when the
    /// guest handles the slot's event, and a request it submits meanwhile would otherwise
    /// never complete. The device's notification ioeventfds and MSI routes stay until then;
    /// [`release_pulled`](Self::release_pulled) lets them go. With `drop`, or once the
    /// driver's reset came, nothing more is written to guest memory.
    ///
    /// Returns what happened to the requests in flight, or `None` if there is no disk `id`.
    pub fn surprise_remove(&self, id: &str, policy: SurprisePolicy) -> Option<InFlightOutcome> {
        self.take_away(id, Some(policy.in_flight), policy.bar_reads)
    }

    fn take_away(
        &self,
        id: &str,
        surprise: Option<InFlightPolicy>,
        bar_reads: BarReads,
    ) -> Option<InFlightOutcome> {
        let mut f = lock(&self.virtio).remove(id)?;
        let outcome = match surprise {
            Some(in_flight) => lock(&f.device).surprise_remove(in_flight),
            None => InFlightOutcome::default(),
        };
        match &f.placement {
            Placement::RootBus(bdf) => {
                let _ = lock(&self.root).remove_device(*bdf);
            }
            Placement::Port { port_bdf, .. } => {
                let _ = lock(&self.root).remove_downstream_device(*port_bdf, 0);
            }
        }
        let writes = if outcome.failing {
            VacatedWrites::ToDevice
        } else {
            VacatedWrites::Dropped
        };
        match bar_reads {
            BarReads::AllOnes => {
                self.bars.unmap_device(&f.shared);
            }
            BarReads::Zero => {
                self.bars.vacate_device(&f.shared, writes);
            }
        }
        if surprise.is_none() {
            lock(&f.device).shutdown();
        }
        if !outcome.failing {
            self.release_resources(&mut f);
        }
        if let Placement::Port { port, .. } = &f.placement {
            if let Some(entry) = self.root_ports.get(port) {
                let mut p = lock(&entry.port);
                if p.slot().is_present() {
                    let _ = p.surprise_remove();
                }
            }
        }
        if let (Some((select, device)), Some(acpi)) = (self.acpi_slot(&f.placement), &self.acpi) {
            let mut c = lock(acpi);
            let _ = match surprise {
                Some(_) => c.surprise_remove(select, device),
                None => c.remove(select, device),
            };
        }
        let bus = placement_bus(&f.placement);
        let what = match surprise {
            Some(in_flight) => json!({
                "surprise": true,
                "in-flight": in_flight.name(),
                "bar-reads": bar_reads.name(),
                "failed": outcome.failed,
                "dropped": outcome.dropped,
                "host-io-pending": outcome.host_io_pending,
                "collected": outcome.collected,
            }),
            None => json!({"surprise": false}),
        };
        crate::trace::slot(&bus, "card-removed", what, Some(id));
        log::info!(
            "virtio-blk {id} {}",
            match surprise {
                Some(_) if outcome.failing =>
                    "pulled out; it fails its driver's requests until the driver resets it",
                Some(_) => "pulled out",
                None => "removed, backend released",
            }
        );
        if outcome.failing {
            f.pulled_bar_reads = Some(bar_reads);
            if bar_reads == BarReads::Zero {
                self.notify_by_bar(&mut f);
            }
            lock(&self.pulled).push(f);
        }
        Some(outcome)
    }

    /// A pulled-out device failing its driver's requests, whose vacated BAR still passes it
    /// writes, fails them from now on on the vCPU that notifies it: its ioeventfds go, so that
    /// a notification exits to the VMM, and the answer and its interrupt are there before that
    /// vCPU runs on. Through an ioeventfd the answer comes from the device's I/O thread, which
    /// a busy host may not run for milliseconds; meanwhile the guest's removal on another vCPU
    /// can mark the queue broken, and Linux (6.1, 6.12) then ignores the answer and waits for
    /// the request forever (docs/surprise-removal.md).
    fn notify_by_bar(&self, f: &mut VirtioFunction) {
        if !lock(&f.device).fail_on_notify() {
            return;
        }
        if let Some(base) = f.bar0 {
            self.set_ioeventfds(f, base, false);
        }
        f.notify_by_bar = true;
        // What was notified through an ioeventfd since the device's thread let go of them.
        lock(&f.device).notify_queues();
    }

    /// Lets go of what the VMM keeps of a function it took away: notification ioeventfds, the
    /// MMIO it assigned. (Its MSI routes go with the function.)
    fn release_resources(&self, f: &mut VirtioFunction) {
        self.move_ioeventfds(f, None);
        if let Some(range) = f.bar0_range.take() {
            let _ = lock(&self.mmio).free(&range);
        }
    }

    /// Lets go of the pulled-out disks for which `end` holds: they stop failing requests (if
    /// their driver has not reset them), their ioeventfds, MSI routes and MMIO are released, and
    /// the trace records `pulled-device-released` with `by`. Returns their keys.
    fn release_pulled(
        &self,
        end: impl Fn(&VirtioFunction) -> bool,
        by: PulledRelease,
    ) -> Vec<FunctionKey> {
        let done: Vec<VirtioFunction> = {
            let mut pulled = lock(&self.pulled);
            let (done, keep) = std::mem::take(&mut *pulled).into_iter().partition(end);
            *pulled = keep;
            done
        };
        let mut keys = Vec::new();
        for mut f in done {
            let id = {
                let mut dev = lock(&f.device);
                if dev.is_failing() {
                    dev.reset();
                }
                dev.id().to_string()
            };
            // The vacated BARs no longer pass writes to the device, so it can go.
            self.bars.vacate_device(&f.shared, VacatedWrites::Dropped);
            self.release_resources(&mut f);
            let by = match by {
                PulledRelease::DriverReset => "driver-reset",
                PulledRelease::Vmm => "vmm",
            };
            crate::trace::slot(
                &placement_bus(&f.placement),
                "pulled-device-released",
                json!({ "by": by }),
                Some(&id),
            );
            log::info!("virtio-blk {id}: pulled-out device released ({by})");
            keys.push(f.key);
        }
        keys
    }

    /// Lets go of pulled-out disk `key` (see [`surprise_remove`](Self::surprise_remove)).
    pub fn release_pulled_disk(&self, key: FunctionKey, by: PulledRelease) {
        self.release_pulled(|f| f.key == key, by);
    }

    /// Where the rings of each pulled-out disk still failing requests stand, by id.
    pub fn pulled_rings(&self) -> Vec<(String, Vec<RingIndices>)> {
        lock(&self.pulled)
            .iter()
            .map(|f| {
                let d = lock(&f.device);
                (d.device().id().to_string(), d.ring_indices())
            })
            .collect()
    }

    /// The pulled-out disks whose driver has reset them: they fail nothing any more.
    pub fn reset_pulled(&self) -> Vec<FunctionKey> {
        lock(&self.pulled)
            .iter()
            .filter(|f| !lock(&f.device).is_failing())
            .map(|f| f.key)
            .collect()
    }

    /// The pulled-out disks let go since the last call because the guest mapped a BAR over
    /// theirs.
    pub fn take_evicted(&self) -> Vec<FunctionKey> {
        std::mem::take(&mut *lock(&self.evicted))
    }

    fn move_ioeventfds(&self, f: &mut VirtioFunction, new: Option<u64>) {
        if f.bar0 == new {
            return;
        }
        if let Some(old) = f.bar0.take() {
            if !f.notify_by_bar {
                self.set_ioeventfds(f, old, false);
            }
        }
        if let Some(base) = new {
            self.set_ioeventfds(f, base, true);
            f.bar0 = Some(base);
        }
    }

    /// Registers (`on`) or unregisters `f`'s ioeventfds for BAR 0 at `base`. One KVM refuses
    /// is reported; the notify write still reaches the device through the BAR: slower, correct.
    fn set_ioeventfds(&self, f: &VirtioFunction, base: u64, on: bool) {
        let dev = lock(&f.device);
        for (addr, _len, evt) in dev.ioeventfds(base) {
            let at = IoEventAddress::Mmio(addr);
            let done = if on {
                self.vm.register_ioevent(&evt, &at, NoDatamatch)
            } else {
                self.vm.unregister_ioevent(&evt, &at, NoDatamatch)
            };
            if let Err(e) = done {
                devices::guest_log::report(
                    "ioeventfd move failed",
                    log::Level::Warn,
                    format_args!(
                        "{}: {}registering ioeventfd at {addr:#x}: {e}",
                        dev.id(),
                        if on { "" } else { "un" }
                    ),
                );
            }
        }
    }

    /// QMP `query-pci`: the functions of bus 0 in QEMU's format (the subset clients use), root
    /// ports with the bus behind them and the device in their slot. The disks are the ones
    /// `query-block` lists, at their placement, even while one the guest ejected is already
    /// off the bus and about to be released: the two replies never disagree.
    pub fn query_pci(&self) -> serde_json::Value {
        type Functions = Vec<(Bdf, SharedPciDevice)>;
        let disks: Vec<(Placement, SharedPciDevice)> = lock(&self.virtio)
            .values()
            .map(|f| (f.placement.clone(), f.shared.clone()))
            .collect();
        let is_disk = |d: &SharedPciDevice| disks.iter().any(|(_, s)| same_device(s, d));
        let (devices, downstream): (Functions, Functions) = {
            let root = lock(&self.root);
            let mut devices: Functions = root
                .devices()
                .filter(|(_, d)| !is_disk(d))
                .map(|(bdf, d)| (bdf, d.clone()))
                .collect();
            devices.extend(disks.iter().filter_map(|(p, d)| match p {
                Placement::RootBus(bdf) => Some((*bdf, d.clone())),
                Placement::Port { .. } => None,
            }));
            devices.sort_by_key(|(bdf, _)| (bdf.device(), bdf.function()));
            let downstream = disks
                .iter()
                .filter_map(|(p, d)| match p {
                    Placement::Port { port_bdf, .. } => Some((*port_bdf, d.clone())),
                    Placement::RootBus(_) => None,
                })
                .collect();
            (devices, downstream)
        };
        let describe = |bus: u8, slot: u8, function: u8, dev: &SharedPciDevice| {
            let mut id = [0u8; 4];
            let mut class = [0u8; 4];
            let qdev_id = {
                let mut d = lock(dev);
                d.config_read(0, &mut id);
                d.config_read(8, &mut class);
                d.id().to_string()
            };
            serde_json::json!({
                "bus": bus,
                "slot": slot,
                "function": function,
                "class_info": {"class": u16::from_le_bytes([class[2], class[3]])},
                "id": {
                    "vendor": u16::from_le_bytes([id[0], id[1]]),
                    "device": u16::from_le_bytes([id[2], id[3]]),
                },
                "qdev_id": qdev_id,
            })
        };
        let mut out = Vec::new();
        for (bdf, dev) in &devices {
            let mut entry = describe(0, bdf.device(), bdf.function(), dev);
            if let Some((_, rp)) = self.root_ports.iter().find(|(_, e)| e.bdf == *bdf) {
                let (secondary, subordinate) = {
                    let p = lock(&rp.port);
                    (p.secondary_bus(), p.subordinate_bus())
                };
                let below: Vec<serde_json::Value> = downstream
                    .iter()
                    .filter(|(bridge, _)| bridge == bdf)
                    .map(|(_, d)| describe(secondary, 0, 0, d))
                    .collect();
                entry["pci_bridge"] = serde_json::json!({
                    "bus": {"number": secondary, "secondary": secondary, "subordinate": subordinate},
                    "devices": below,
                });
            }
            out.push(entry);
        }
        serde_json::json!([{"bus": 0, "devices": out}])
    }

    /// QMP `query-block`: every disk with its backing file.
    pub fn query_block(&self) -> serde_json::Value {
        let virtio = lock(&self.virtio);
        let disks: Vec<serde_json::Value> = virtio
            .iter()
            .map(|(id, f)| {
                serde_json::json!({
                    "device": "",
                    "qdev": id,
                    "locked": false,
                    "removable": false,
                    "type": "unknown",
                    "inserted": {
                        "node-name": f.node.clone().unwrap_or_else(|| id.clone()),
                        "file": f.path.display().to_string(),
                        "ro": f.readonly,
                        "drv": f.format.0.name(),
                    },
                })
            })
            .collect();
        serde_json::Value::Array(disks)
    }

    // ---- Saving and restoring ----

    /// Pauses every disk's I/O (the pulled-out ones' too): the requests in flight finish and
    /// are published, then nothing touches guest memory until [`resume`](Self::resume).
    pub fn pause(&self) {
        for f in lock(&self.virtio).values() {
            lock(&f.device).pause();
        }
        for f in lock(&self.pulled).iter() {
            lock(&f.device).pause();
        }
    }

    /// Serves the disks' queues again.
    pub fn resume(&self) {
        for f in lock(&self.virtio).values() {
            lock(&f.device).resume();
        }
        for f in lock(&self.pulled).iter() {
            lock(&f.device).resume();
        }
    }

    /// The devices' state; they must be [paused](Self::pause).
    pub fn state(&self) -> Result<PciDevicesState, String> {
        let disk = |f: &VirtioFunction| -> Result<DiskState, String> {
            // The size now, if the name still leads to the file the disk uses.
            let mut identity = f.identity;
            if let Ok(now) = BackendIdentity::of_path(&f.path) {
                if (now.dev, now.ino) == (identity.dev, identity.ino) {
                    identity.size = now.size;
                }
            }
            Ok(DiskState {
                key: f.key,
                id: f.id(),
                path: f.path.clone(),
                readonly: f.readonly,
                format: f.format.0,
                format_probed: f.format.1,
                node: f.node.clone(),
                placement: match &f.placement {
                    Placement::RootBus(bdf) => SavedPlacement::RootBus(bdf.device()),
                    Placement::Port { port, .. } => SavedPlacement::Port(port.clone()),
                },
                bar0: f.bar0,
                bar0_range: f.bar0_range.map(|r| (r.start(), r.end())),
                identity,
                capacity: f.capacity,
                pulled_bar_reads: f.pulled_bar_reads,
                function: lock(&f.device).state().map_err(|e| e.to_string())?,
            })
        };
        Ok(PciDevicesState {
            root_ports: self
                .root_ports
                .iter()
                .map(|(id, e)| (id.clone(), lock(&e.port).state()))
                .collect(),
            acpi_hotplug: self.acpi.as_ref().map(|a| lock(a).state()),
            osc: self.osc.as_ref().map(|o| lock(o).state()),
            disks: lock(&self.virtio)
                .values()
                .map(disk)
                .collect::<Result<_, _>>()?,
            pulled: lock(&self.pulled)
                .iter()
                .map(disk)
                .collect::<Result<_, _>>()?,
            vacated: self.bars.vacated(),
        })
    }

    /// Puts a saved machine's devices back into this one, built from the same command line
    /// with no disks: the root ports, the ACPI hot-plug controller and the `_OSC` report as
    /// they were, and every disk — in its slot with `files[id]` as its backend, or pulled out
    /// and failing without one — with its function's state, its BARs mapped where the guest
    /// put them and its ioeventfds there. The disks stay paused until [`resume`](Self::resume).
    pub fn restore(
        &self,
        state: &PciDevicesState,
        mut files: BTreeMap<String, std::fs::File>,
    ) -> Result<(), String> {
        for (id, entry) in &self.root_ports {
            let saved = state
                .root_ports
                .get(id)
                .ok_or_else(|| format!("the snapshot has no state for root port {id}"))?;
            lock(&entry.port)
                .restore(saved)
                .map_err(|e| e.to_string())?;
        }
        if let (Some(acpi), Some(saved)) = (&self.acpi, &state.acpi_hotplug) {
            lock(acpi).restore(saved).map_err(|e| e.to_string())?;
        }
        if let (Some(osc), Some(saved)) = (&self.osc, &state.osc) {
            lock(osc).restore(saved);
        }
        for region in &state.vacated {
            if !self.bars.restore_vacated(region) {
                log::warn!(
                    "vacated BAR at {:#x} overlaps another: left out",
                    region.address
                );
            }
        }
        for d in &state.disks {
            let file = files
                .remove(&d.id)
                .ok_or_else(|| format!("no backend opened for {}", d.id))?;
            self.restore_disk(d, Some(file))?;
        }
        for d in &state.pulled {
            self.restore_disk(d, None)?;
        }
        Ok(())
    }

    /// One saved disk, with its backend `file` (in its slot) or none (pulled out).
    fn restore_disk(&self, d: &DiskState, file: Option<std::fs::File>) -> Result<(), String> {
        let id = &d.id;
        let err = |e: &dyn std::fmt::Display| format!("{id}: {e}");
        let format = (!d.format_probed).then_some(d.format);
        let config = self.block_config(&d.path, id, d.readonly, format);
        let attached = file.is_some();
        let block = match file {
            Some(file) => Block::with_file(config, file),
            None => Block::without_backend(config, d.capacity),
        }
        .map_err(|e| err(&e))?;
        if attached && block.format() != d.format {
            return Err(format!(
                "{id}: its image probes as {} now, the guest knew a {} image",
                block.format(),
                d.format
            ));
        }
        if block.capacity() != d.capacity {
            return Err(format!(
                "{id}: its image has {} sectors, the guest knew {}",
                block.capacity(),
                d.capacity
            ));
        }
        let mut dev = self.virtio_function(id, block).map_err(|e| e.to_string())?;
        dev.restore(&d.function).map_err(|e| err(&e))?;
        let (placement, bdf) = match &d.placement {
            SavedPlacement::RootBus(device) => {
                let bdf = Bdf::new(0, *device, 0).ok_or_else(|| err(&"no such slot"))?;
                (Placement::RootBus(bdf), bdf)
            }
            SavedPlacement::Port(port) => {
                let entry = self
                    .root_ports
                    .get(port)
                    .ok_or_else(|| err(&format!("no root port {port}")))?;
                let secondary = lock(&entry.port).secondary_bus();
                let bdf = Bdf::new(secondary, 0, 0).ok_or_else(|| err(&"no bus"))?;
                (
                    Placement::Port {
                        port: port.clone(),
                        port_bdf: entry.bdf,
                    },
                    bdf,
                )
            }
        };
        let bar0_range = match d.bar0_range {
            Some((start, end)) if end >= start => Some(
                lock(&self.mmio)
                    .allocate(end - start + 1, 1, AllocPolicy::ExactMatch(start))
                    .map_err(|e| err(&format!("BAR 0 at {start:#x}: {e}")))?,
            ),
            _ => None,
        };
        let changes: Vec<BarReprogram> = dev
            .decoded_bars()
            .into_iter()
            .map(|b| BarReprogram {
                index: b.index,
                kind: b.kind,
                size: b.size,
                old: None,
                new: Some(b.address),
            })
            .collect();
        let dev = Arc::new(Mutex::new(dev));
        let shared: SharedPciDevice = dev.clone();
        let mut f = VirtioFunction {
            key: d.key,
            device: dev,
            shared: shared.clone(),
            path: d.path.clone(),
            readonly: d.readonly,
            format: (d.format, d.format_probed),
            node: d.node.clone(),
            placement: placement.clone(),
            bar0: None,
            bar0_range,
            identity: d.identity,
            capacity: d.capacity,
            pulled_bar_reads: d.pulled_bar_reads,
            notify_by_bar: false,
        };
        if attached {
            let added = match &placement {
                Placement::RootBus(bdf) => lock(&self.root).add_device(*bdf, shared.clone()),
                Placement::Port { port_bdf, .. } => {
                    lock(&self.root).add_downstream_device(*port_bdf, 0, shared.clone())
                }
            };
            added.map_err(|e| err(&e))?;
            self.bars.reprogram_bars(bdf, &shared, &changes);
            self.move_ioeventfds(&mut f, d.bar0);
            lock(&self.virtio).insert(id.clone(), f);
        } else {
            if d.pulled_bar_reads == Some(BarReads::Zero) {
                self.bars.reprogram_bars(bdf, &shared, &changes);
                self.bars.vacate_device(&shared, VacatedWrites::ToDevice);
            }
            // As when it was pulled (notify_by_bar); the queues are looked at on resume.
            if d.pulled_bar_reads == Some(BarReads::Zero) && lock(&f.device).fail_on_notify() {
                f.bar0 = d.bar0;
                f.notify_by_bar = true;
            } else {
                self.move_ioeventfds(&mut f, d.bar0);
            }
            lock(&self.pulled).push(f);
        }
        log::info!(
            "virtio-blk {id} restored{}",
            if attached {
                ""
            } else {
                " (pulled out, failing its requests)"
            }
        );
        Ok(())
    }

    /// Removes every device (at exit): stops their I/O threads and releases their backends.
    pub fn shutdown(&self) {
        let ids: Vec<String> = lock(&self.virtio).keys().cloned().collect();
        for id in ids {
            self.unplug(&id);
        }
        self.release_pulled(|_| true, PulledRelease::Vmm);
    }
}

impl BarReprogrammingHandler for PciDevices {
    fn reprogram_bars(&self, bdf: Bdf, device: &SharedPciDevice, changes: &[BarReprogram]) {
        // A BAR mapped over a pulled-out device's evicts it; its ioeventfds must go first.
        for c in changes.iter().filter(|c| !c.kind.is_io()) {
            if let Some(new) = c.new {
                let evicted = self.release_pulled(
                    |f| {
                        f.bar0.is_some_and(|b| {
                            b < new.saturating_add(c.size) && new < b.saturating_add(BAR0_SIZE)
                        })
                    },
                    PulledRelease::Vmm,
                );
                lock(&self.evicted).extend(evicted);
            }
        }
        let mut virtio = lock(&self.virtio);
        // A device unplugged meanwhile stays unmapped.
        let Some(f) = virtio.values_mut().find(|f| same_device(&f.shared, device)) else {
            return;
        };
        self.bars.reprogram_bars(bdf, device, changes);
        {
            for c in changes.iter().filter(|c| c.index == 0) {
                self.move_ioeventfds(f, c.new);
            }
        }
    }
}

impl VirtioFunction {
    /// Its device's id (a pulled-out function is in no map keyed by it).
    fn id(&self) -> String {
        lock(&self.device).id().to_string()
    }
}

/// The bus a disk sits on, as the control socket names it.
fn placement_bus(placement: &Placement) -> String {
    match placement {
        Placement::Port { port, .. } => port.clone(),
        Placement::RootBus(_) => "pcie.0".to_string(),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
