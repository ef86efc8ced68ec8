//! The running machine as the control socket sees it: what `stop`, `cont`, `query-status` and
//! the migrations act on. It carries out what [`RunStates`] decides — parking the vCPUs, then
//! pausing the disks' I/O and the hot-plug clock, or the reverse — and takes and restores the
//! machine's state ([`MachineState`]) while it is paused.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::{PciConfigIo, PciHostBridge};
use devices::power_control::PowerControl;
use devices::serial::SerialDevice;
use devices::virtio::GuestRam;
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde_json::json;

use crate::exit::ExitSignal;
use crate::hotplug::Hotplug;
use crate::migration::compat::MachineConfig;
use crate::migration::status::{MigrationInfo, Status};
use crate::pci_devices::PciDevices;
use crate::qmp::QmpEvents;
use crate::run_state::{Effect, RunStateError, RunStates};
use crate::snapshot::{IrqchipState, MachineState, PlatformState};
use crate::vcpu::VcpuSet;

/// What exists from the start, before a machine does (a migration coming in builds it later):
/// the control socket's events, the run state, the migration status and the exit signal.
pub struct Shared {
    /// Events to the control socket's clients.
    pub events: QmpEvents,
    /// The run state.
    pub run: Mutex<RunStates>,
    /// The migration under way or last done.
    pub migration: Mutex<MigrationInfo>,
    /// `migrate_cancel` was asked for.
    pub cancel: AtomicBool,
    /// Ends the VM.
    pub exit: Arc<ExitSignal>,
}

impl Shared {
    /// The shared state of a VM starting in `run`.
    pub fn new(events: QmpEvents, run: RunStates, exit: Arc<ExitSignal>) -> Self {
        Shared {
            events,
            run: Mutex::new(run),
            migration: Mutex::new(MigrationInfo::default()),
            cancel: AtomicBool::new(false),
            exit,
        }
    }

    /// The run state.
    pub fn run(&self) -> MutexGuard<'_, RunStates> {
        lock(&self.run)
    }

    /// The migration status.
    pub fn migration(&self) -> MutexGuard<'_, MigrationInfo> {
        lock(&self.migration)
    }

    /// Sets the migration's status and tells the clients (`MIGRATION`).
    pub fn set_migration_status(&self, status: Status) {
        self.migration().status = status;
        self.emit_migration_status(status);
    }

    fn emit_migration_status(&self, status: Status) {
        self.events
            .emit("MIGRATION", json!({ "status": status.name() }));
    }

    /// The migration is ending: records how long it took and, if it failed, why. Its final
    /// status follows with [`set_migration_status`](Self::set_migration_status).
    pub fn migration_ending(&self, error: Option<&str>) {
        let mut m = self.migration();
        m.total_time = m.started.map(|s| s.elapsed());
        if let Some(e) = error {
            m.error = Some(e.to_string());
        }
    }

    /// `migrate_cancel`: a migration out that has not ended is told to stop (`cancelling`).
    /// Returns whether there was one.
    pub fn cancel_migration(&self) -> bool {
        let mut m = self.migration();
        if m.status.is_final() {
            return false;
        }
        m.status = Status::Cancelling;
        drop(m);
        self.cancel
            .store(true, std::sync::atomic::Ordering::Release);
        self.emit_migration_status(Status::Cancelling);
        true
    }

    /// `query-status`.
    pub fn query_status(&self) -> serde_json::Value {
        let run = self.run();
        json!({
            "status": run.state().name(),
            "running": run.is_running(),
            "singlestep": false,
        })
    }
}

/// The platform devices whose state a snapshot carries.
pub struct Platform {
    /// The 16550 console.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The ACPI power registers.
    pub power: Arc<Mutex<PowerControl>>,
    /// The 0xCF8 configuration mechanism.
    pub config_io: Arc<Mutex<PciConfigIo>>,
    /// The host bridge.
    pub host_bridge: Arc<Mutex<PciHostBridge>>,
}

/// The machine, for the control socket and the migrations. See the module documentation.
pub struct Runtime {
    /// The KVM VM.
    pub vm: Arc<VmFd>,
    /// Its vCPU threads.
    pub vcpus: Arc<VcpuSet>,
    /// Guest RAM.
    pub memory: GuestRam,
    /// Platform devices.
    pub platform: Platform,
    /// PCI devices.
    pub pci: Arc<PciDevices>,
    /// Hot-plug.
    pub hotplug: Arc<Hotplug>,
    /// What the machine is made of.
    pub machine: MachineConfig,
    /// Run state, events, migration status.
    pub shared: Arc<Shared>,
}

impl Runtime {
    /// Carries out `effect`: pauses or resumes the machine and tells the clients.
    pub fn apply(&self, effect: Option<Effect>) {
        match effect {
            Some(Effect::Pause) => {
                self.pause_machine();
                self.shared.events.emit("STOP", serde_json::Value::Null);
            }
            Some(Effect::Resume) => {
                self.resume_machine();
                self.shared.events.emit("RESUME", serde_json::Value::Null);
            }
            None => {}
        }
    }

    /// Parks the vCPUs, then lets the disks finish their requests in flight and pause, then
    /// has the hot-plug worker handle what the guest did before it stopped.
    pub fn pause_machine(&self) {
        self.vcpus.pause();
        self.pci.pause();
        self.hotplug.pause();
    }

    /// The reverse of [`pause_machine`](Self::pause_machine).
    pub fn resume_machine(&self) {
        self.hotplug.resume();
        self.pci.resume();
        self.vcpus.resume();
    }

    /// `stop`.
    pub fn stop(&self) {
        let mut run = self.shared.run();
        let effect = run.stop();
        self.apply(effect);
    }

    /// `cont`.
    pub fn cont(&self) -> Result<(), RunStateError> {
        let mut run = self.shared.run();
        let effect = run.cont()?;
        self.apply(effect);
        Ok(())
    }

    /// The machine's state but its memory; it must be paused.
    pub fn save(&self, running: bool) -> Result<MachineState, String> {
        // A disk added while the VM was stopped has not been paused yet.
        self.pci.pause();
        let vcpus = self.vcpus.save()?;
        let mut chips = Vec::new();
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(|e| format!("KVM_GET_IRQCHIP {id}: {e}"))?;
            chips.push(chip);
        }
        let clock = self
            .vm
            .get_clock()
            .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
        let p = &self.platform;
        let platform = PlatformState {
            serial: lock(&p.serial).state(),
            sleep_status: lock(&p.power).sleep_status(),
            config_address: lock(&p.config_io).config_address(),
            host_bridge: lock(&p.host_bridge).state(),
        };
        Ok(MachineState {
            running,
            vcpus,
            irqchip: IrqchipState { chips },
            clock,
            platform,
            pci: self.pci.state()?,
            hotplug: self.hotplug.state()?,
        })
    }
}

/// Restores the VM-wide KVM state of `state` into `vm`: the interrupt controllers and the clock.
pub fn restore_kvm(vm: &VmFd, state: &MachineState) -> Result<(), String> {
    for chip in &state.irqchip.chips {
        vm.set_irqchip(chip)
            .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", chip.chip_id))?;
    }
    let mut clock = state.clock;
    // KVM takes only the clock value back, not the flags it reported.
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
