//! Hot-plug as the control socket drives it (SPEC.md §5, §6): the thin adapter between the
//! control plane ([`devices::hotplug::HotplugControl`], where every rule lives and is tested)
//! and the machine. QMP arguments come in and become typed commands; the guest's Slot Control
//! writes and `_EJ0` ejects, heard on vCPU threads, come in through a channel; the control
//! plane's actions go out to [`PciDevices`] (devices, KVM plumbing), the root ports, the ACPI
//! hot-plug controller, the trace and the control socket's clients.
//!
//! A worker thread takes the guest's events off the vCPUs, ticks the control plane twice a
//! second (releases after a power-off without indicator-off, re-presses, `X_UNPLUG_STALLED`),
//! and tells it which pulled-out devices their driver has reset.
//!
//! One mutex serializes every hot-plug operation (commands and the worker), so a client never
//! sees a half-added or half-removed device: the control plane and the devices change together.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::acpi_hotplug::{AcpiBusState, AcpiHotplugObserver};
use devices::hotplug::topology::{root_bus_slot_number, ROOT_BUS_SELECT};
use devices::hotplug::{
    Action, BusId, Command, DeviceAdd, Event, GuestEvent, HostEvent, HotplugControl, HotplugError,
    PortSlotView, Press, ReleaseCause, SlotChange, SlotId, SlotRegisters, SurprisePolicy,
};
use devices::osc_report::OscEvaluation;
use devices::pci::{PcieRootPort, SlotEvent, SlotObserver};
use devices::virtio::block::{open_image, Disk, ImageFormat};
use devices::virtio::InFlightOutcome;
use serde_json::{json, Map, Value};

use crate::backend_identity::BackendIdentity;
use crate::config::parse_backend_error;
use crate::pci_devices::{AddDeviceError, DiskImage, DiskSpec, PciDevices};
use crate::qmp::typed::parse_args;
use crate::qmp::{QmpError, QmpEvents};
use serde::Deserialize;

/// The only device model `device_add` knows.
pub const VIRTIO_BLK_PCI: &str = "virtio-blk-pci";

/// The control plane and the open backends' files, changed together under one lock.
struct Plane {
    control: HotplugControl,
    /// The files of the `blockdev-add` nodes, by node name.
    files: BTreeMap<String, File>,
}

struct Inner {
    pci: Arc<PciDevices>,
    events: QmpEvents,
    plane: Mutex<Plane>,
    /// The control plane's time: the VM's running time, which stands still while it is
    /// paused and goes on from where the source left it after a restore.
    clock: Mutex<VmClock>,
}

/// Time that runs only while the VM runs.
struct VmClock {
    /// Running time accumulated before `since`.
    base: Duration,
    /// When the VM last started running, if it runs.
    since: Option<Instant>,
}

impl VmClock {
    fn now(&self) -> Duration {
        self.base + self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    fn stop(&mut self) {
        self.base = self.now();
        self.since = None;
    }

    fn start(&mut self) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }
}

/// A `blockdev-add` node of a saved machine.
#[derive(Clone, Debug, serde::Serialize, Deserialize)]
pub struct NodeState {
    /// Its image.
    pub path: std::path::PathBuf,
    /// Opened read-only.
    pub readonly: bool,
    /// Which file it had open.
    pub identity: BackendIdentity,
}

/// The hot-plug side of a saved machine: the control plane (every function's lifecycle,
/// pending removals with their age and repeat counts, pulled devices), its clock, and the
/// `blockdev-add` nodes' files.
#[derive(Clone, Debug, serde::Serialize, Deserialize)]
pub struct HotplugState {
    /// The control plane.
    pub control: HotplugControl,
    /// The control plane's time when the state was taken.
    pub now: Duration,
    /// The nodes' files, by node name.
    pub nodes: BTreeMap<String, NodeState>,
}

enum Msg {
    /// Answer once every message sent before this one has been handled.
    Flush(Sender<()>),
    Slot(String, SlotEvent),
    /// The guest ejected device `.1` of ACPI hot-plug bus `.0`.
    AcpiEject(u8, u8),
    /// Disk `id`'s backend failed: (id, operation, error).
    BackendError(String, String, String),
    Stop,
}

/// Forwards slot events from the vCPU threads to the worker.
struct Forwarder(Sender<Msg>);

impl SlotObserver for Forwarder {
    fn slot_event(&self, port_id: &str, event: SlotEvent) {
        let (change, value) = slot_change(event);
        crate::trace::slot(port_id, change, value, None);
        let _ = self.0.send(Msg::Slot(port_id.to_string(), event));
    }
}

/// How `X_HOTPLUG_SLOT` and the trace name a slot event: the change and its new value.
fn slot_change(event: SlotEvent) -> (&'static str, Value) {
    match event {
        SlotEvent::PowerOn => ("power", json!("on")),
        SlotEvent::PowerOff => ("power", json!("off")),
        SlotEvent::PowerIndicator(i) => ("power-indicator", json!(i.to_string())),
        SlotEvent::AttentionIndicator(i) => ("attention-indicator", json!(i.to_string())),
        SlotEvent::Notifications(n) => ("armed", json!(n.armed())),
        SlotEvent::LinkActive(up) => ("link", json!(if up { "up" } else { "down" })),
    }
}

/// Hears the guest's ACPI ejects on a vCPU thread: takes the function off the bus at once (as
/// a powered-off native slot does, so that no rescan of the guest's sees it again), and leaves
/// the rest of the removal to the worker.
struct AcpiForwarder {
    tx: Sender<Msg>,
    pci: Arc<PciDevices>,
}

impl AcpiHotplugObserver for AcpiForwarder {
    fn ejected(&self, bus: u8, slot: u8) {
        crate::trace::slot(
            &format!("acpi-bus-{bus}"),
            "ejected-by-guest",
            json!(format!("{slot:02x}.0")),
            None,
        );
        if bus == ROOT_BUS_SELECT {
            self.pci.hide_root_bus_device(slot);
        } else if slot == 0 {
            self.pci.hide_port_device(bus);
        }
        let _ = self.tx.send(Msg::AcpiEject(bus, slot));
    }
}

/// The slots' registers, read from the live devices.
struct LiveRegisters<'a>(&'a PciDevices);

impl SlotRegisters for LiveRegisters<'_> {
    fn port_slot(&self, port: u8) -> Option<PortSlotView> {
        let entry = self.0.port(port)?;
        let p = lock(&entry.port);
        Some(PortSlotView::of(p.slot(), p.msi_enabled()))
    }

    fn acpi_bus(&self, select: u8) -> Option<AcpiBusState> {
        lock(self.0.acpi_hotplug()?).bus(select).copied()
    }
}

/// The hot-plug side of the machine. See the module documentation.
pub struct Hotplug {
    inner: Arc<Inner>,
    tx: Sender<Msg>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Hotplug {
    /// Watches every root port of `pci` and reports to the clients of `events`; `control`
    /// knows the machine and its disks. The control plane's clock starts at `now` (a restored
    /// machine's goes on from where it was) and runs once [`resume`](Self::resume)d; `files`
    /// are the nodes' files (a restored machine's, opened and checked by the caller).
    pub fn start_at(
        pci: Arc<PciDevices>,
        events: QmpEvents,
        control: HotplugControl,
        now: Duration,
        files: BTreeMap<String, File>,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            pci,
            events,
            plane: Mutex::new(Plane { control, files }),
            clock: Mutex::new(VmClock {
                base: now,
                since: None,
            }),
        });
        let (tx, rx) = channel();
        let forwarder: Arc<dyn SlotObserver> = Arc::new(Forwarder(tx.clone()));
        for (_, entry) in inner.pci.root_ports() {
            lock(&entry.port).set_observer(Some(forwarder.clone()));
        }
        if let Some(acpi) = inner.pci.acpi_hotplug() {
            // A reference cycle (devices → controller → observer → devices) until stop().
            lock(acpi).set_observer(Some(Arc::new(AcpiForwarder {
                tx: tx.clone(),
                pci: inner.pci.clone(),
            })));
        }
        let backend_tx = tx.clone();
        inner.pci.backend_errors().set_target(Some(Box::new(
            move |id: &str, op: &str, e: &std::io::Error| {
                let _ = backend_tx.send(Msg::BackendError(
                    id.to_string(),
                    op.to_string(),
                    e.to_string(),
                ));
            },
        )));
        let worker = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("hotplug".into())
                .spawn(move || loop {
                    let msg = match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                        Ok(Msg::Flush(done)) => {
                            let _ = done.send(());
                            continue;
                        }
                        Ok(msg) => Some(msg),
                        Err(RecvTimeoutError::Timeout) => None,
                    };
                    inner.on_message(msg);
                })?
        };
        Ok(Hotplug {
            inner,
            tx,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Runs a hot-plug command: its reply, or why it was refused (and then nothing changed).
    pub fn run(&self, command: Command) -> Result<Value, QmpError> {
        self.inner.run(command)
    }

    /// `x-query-hotplug`.
    pub fn query(&self) -> Value {
        self.inner.query_hotplug()
    }

    /// The VM runs: the control plane's clock runs.
    pub fn resume(&self) {
        lock(&self.inner.clock).start();
    }

    /// The VM has stopped (its vCPUs are parked): handles every guest event the vCPUs sent
    /// before they stopped, then stops the clock, so that nothing falls due while the VM does
    /// not run and the state taken next includes everything the guest did.
    pub fn pause(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
        lock(&self.inner.clock).stop();
    }

    /// The control plane, its clock and the nodes' files; the VM must be paused.
    pub fn state(&self) -> Result<HotplugState, String> {
        let plane = self.inner.plane();
        let mut nodes = BTreeMap::new();
        for (name, node) in plane.control.nodes() {
            let file = plane
                .files
                .get(name)
                .ok_or_else(|| format!("node {name} has no open file"))?;
            let identity = BackendIdentity::of(file).map_err(|e| format!("node {name}: {e}"))?;
            nodes.insert(
                name.clone(),
                NodeState {
                    path: node.path.clone(),
                    readonly: node.readonly,
                    identity,
                },
            );
        }
        Ok(HotplugState {
            control: plane.control.clone(),
            now: self.inner.now(),
            nodes,
        })
    }

    /// Stops watching the slots and joins the worker (at exit, before the devices go).
    pub fn stop(&self) {
        for (_, entry) in self.inner.pci.root_ports() {
            lock(&entry.port).set_observer(None);
        }
        if let Some(acpi) = self.inner.pci.acpi_hotplug() {
            lock(acpi).set_observer(None);
        }
        self.inner.pci.backend_errors().set_target(None);
        let _ = self.tx.send(Msg::Stop);
        if let Some(w) = lock(&self.worker).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Hotplug {
    fn drop(&mut self) {
        self.stop();
    }
}

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

fn qmp_error(e: HotplugError) -> QmpError {
    match e {
        HotplugError::DeviceNotFound(id) => QmpError::device_not_found(&id),
        e => generic(e.to_string()),
    }
}

/// `name`'s value parsed (`FromStr` errors become the command's error).
fn parsed<T: std::str::FromStr<Err = String>>(
    name: &str,
    value: Option<String>,
) -> Result<Option<T>, QmpError> {
    value
        .map(|v| {
            v.parse()
                .map_err(|e| generic(format!("Parameter '{name}': {e}")))
        })
        .transpose()
}

/// `blockdev-add`'s arguments (QEMU's `BlockdevOptions`, the subset of raw, qcow2 and file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockdevAddArgs {
    driver: String,
    #[serde(rename = "node-name")]
    node_name: String,
    file: Option<FileArgs>,
    filename: Option<String>,
    #[serde(rename = "read-only", default)]
    read_only: bool,
}

/// A `raw` or `qcow2` node's `file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileArgs {
    driver: String,
    filename: String,
}

/// `blockdev-add`: the typed command.
pub fn blockdev_add_command(args: &Map<String, Value>) -> Result<Command, QmpError> {
    let a: BlockdevAddArgs = parse_args(args)?;
    let (filename, format) = match a.driver.as_str() {
        "raw" | "qcow2" => {
            let driver = &a.driver;
            if a.filename.is_some() {
                return Err(generic(format!(
                    "driver '{driver}' takes its image as 'file': {{\"driver\": \"file\", \"filename\": ...}}"
                )));
            }
            let file = a
                .file
                .ok_or_else(|| generic("Parameter 'file' is missing"))?;
            if file.driver != "file" {
                return Err(generic(format!(
                    "file: driver '{}' is not supported (only 'file')",
                    file.driver
                )));
            }
            let format = ImageFormat::from_name(driver).expect("raw and qcow2 are formats");
            (file.filename, format)
        }
        "file" => {
            if a.file.is_some() {
                return Err(generic("driver 'file' takes 'filename', not 'file'"));
            }
            let filename = a
                .filename
                .ok_or_else(|| generic("Parameter 'filename' is missing"))?;
            (filename, ImageFormat::Raw)
        }
        other => {
            return Err(generic(format!(
                "Invalid parameter value for 'driver': '{other}' (supported: raw, qcow2, file)"
            )))
        }
    };
    Ok(Command::BlockdevAdd {
        node: a.node_name,
        path: filename.into(),
        readonly: a.read_only,
        format,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeArgs {
    #[serde(rename = "node-name")]
    node_name: String,
}

/// `blockdev-del`: the typed command.
pub fn blockdev_del_command(args: &Map<String, Value>) -> Result<Command, QmpError> {
    let a: NodeArgs = parse_args(args)?;
    Ok(Command::BlockdevDel { node: a.node_name })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceAddArgs {
    driver: String,
    id: String,
    drive: String,
    bus: Option<String>,
    addr: Option<String>,
    #[serde(rename = "x-backend-error")]
    backend_error: Option<String>,
}

/// `device_add`: the typed command.
pub fn device_add_command(args: &Map<String, Value>) -> Result<Command, QmpError> {
    let a: DeviceAddArgs = parse_args(args)?;
    if a.driver != VIRTIO_BLK_PCI {
        return Err(generic(format!(
            "'{}' is not a valid device model name (this VMM hot-plugs {VIRTIO_BLK_PCI})",
            a.driver
        )));
    }
    let bus = a
        .bus
        .map(|b| b.parse::<BusId>().map_err(generic))
        .transpose()?;
    let addr = a.addr.map(|a| a.parse().map_err(generic)).transpose()?;
    let remove_on_backend_error = a
        .backend_error
        .map(|action| {
            parse_backend_error(&action)
                .map_err(|e| generic(format!("Parameter 'x-backend-error': {e}")))
        })
        .transpose()?;
    Ok(Command::DeviceAdd(DeviceAdd {
        id: a.id,
        drive: a.drive,
        bus,
        addr,
        remove_on_backend_error,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    id: String,
}

/// `device_del`: the typed command.
pub fn device_del_command(args: &Map<String, Value>) -> Result<Command, QmpError> {
    let a: IdArgs = parse_args(args)?;
    Ok(Command::DeviceDel { id: a.id })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SurpriseRemoveArgs {
    id: String,
    #[serde(rename = "in-flight")]
    in_flight: Option<String>,
    #[serde(rename = "bar-reads")]
    bar_reads: Option<String>,
}

/// `x-surprise-remove`: the typed command.
pub fn surprise_remove_command(args: &Map<String, Value>) -> Result<Command, QmpError> {
    let a: SurpriseRemoveArgs = parse_args(args)?;
    Ok(Command::SurpriseRemove {
        id: a.id,
        in_flight: parsed("in-flight", a.in_flight)?,
        bar_reads: parsed("bar-reads", a.bar_reads)?,
    })
}

/// What carrying out a command's actions produced for its reply.
#[derive(Default)]
struct Done {
    /// A surprise removal: its policy and what happened to the requests in flight.
    pulled: Option<(SurprisePolicy, InFlightOutcome)>,
}

impl Inner {
    fn plane(&self) -> MutexGuard<'_, Plane> {
        lock(&self.plane)
    }

    fn now(&self) -> Duration {
        lock(&self.clock).now()
    }

    /// Runs a command through the control plane and carries out its answer; if the first
    /// action fails, the control plane is restored and nothing has changed.
    fn run(&self, command: Command) -> Result<Value, QmpError> {
        let mut plane = self.plane();
        self.sync_pulled(&mut plane);
        let regs = LiveRegisters(&self.pci);
        let before = plane.control.clone();
        let actions = plane
            .control
            .command(self.now(), command, &regs)
            .map_err(qmp_error)?;
        let done = match self.carry_out(&mut plane, actions) {
            Ok(done) => done,
            Err(e) => {
                plane.control = before;
                return Err(e);
            }
        };
        Ok(match done.pulled {
            Some((policy, outcome)) => json!({
                "in-flight": policy.in_flight.name(),
                "bar-reads": policy.bar_reads.name(),
                "failed": outcome.failed,
                "dropped": outcome.dropped,
                "host-io-pending": outcome.host_io_pending,
                "collected": outcome.collected,
            }),
            None => json!({}),
        })
    }

    /// The worker's turn: a guest or host event (if any), then the clock.
    fn on_message(&self, msg: Option<Msg>) {
        let mut plane = self.plane();
        let regs = LiveRegisters(&self.pci);
        let now = self.now();
        let actions = match msg {
            Some(Msg::Slot(port, event)) => match port.parse::<BusId>() {
                Ok(BusId::Port(port)) => plane
                    .control
                    .guest_event(now, GuestEvent::SlotControl { port, event }),
                _ => Vec::new(),
            },
            Some(Msg::AcpiEject(select, device)) => plane
                .control
                .guest_event(now, GuestEvent::Eject { select, device }),
            Some(Msg::BackendError(id, operation, error)) => plane.control.host_event(
                now,
                HostEvent::BackendFailed {
                    id,
                    operation,
                    error,
                },
                &regs,
            ),
            Some(Msg::Stop) | Some(Msg::Flush(_)) | None => Vec::new(),
        };
        self.carry_out_all(&mut plane, actions);
        let actions = plane.control.tick(now, &regs);
        self.carry_out_all(&mut plane, actions);
        self.sync_pulled(&mut plane);
    }

    /// Tells the control plane which pulled-out devices their driver reset and which the VMM
    /// let go by itself.
    fn sync_pulled(&self, plane: &mut Plane) {
        let regs = LiveRegisters(&self.pci);
        let now = self.now();
        for key in self.pci.take_evicted() {
            plane
                .control
                .host_event(now, HostEvent::PulledGone { key }, &regs);
        }
        for key in self.pci.reset_pulled() {
            let actions = plane
                .control
                .guest_event(now, GuestEvent::DriverReset { key });
            self.carry_out_all(plane, actions);
        }
    }

    /// Carries out actions that cannot be refused (events and ticks): a failure is logged.
    fn carry_out_all(&self, plane: &mut Plane, actions: Vec<Action>) {
        if let Err(e) = self.carry_out(plane, actions) {
            log::warn!("hot-plug: {}", e.desc);
        }
    }

    /// Carries out `actions` in order. Only the first may fail (see
    /// [`devices::hotplug::Action`]); the error is then the command's.
    fn carry_out(&self, plane: &mut Plane, actions: Vec<Action>) -> Result<Done, QmpError> {
        let mut done = Done::default();
        let mut gone = Vec::new();
        for action in actions {
            match action {
                Action::OpenBackend {
                    node,
                    path,
                    readonly,
                    format,
                } => {
                    let file = open_backend(&path, readonly, format)?;
                    log::info!(
                        "blockdev {node}: {} ({format}, read-only: {readonly})",
                        path.display()
                    );
                    plane.files.insert(node, file);
                }
                Action::CloseBackend { node } => {
                    plane.files.remove(&node);
                    log::info!("blockdev {node} closed");
                }
                Action::Plug {
                    key,
                    id,
                    slot,
                    node,
                } => {
                    let backing = plane
                        .control
                        .function(key)
                        .map(|f| f.backing.clone())
                        .ok_or_else(|| generic(format!("{id}: not in the control plane")))?;
                    let format = plane.control.nodes().get(&node).map(|n| n.format);
                    let file = plane
                        .files
                        .get(&node)
                        .ok_or_else(|| generic(format!("Drive '{node}' is not open")))?
                        .try_clone()
                        .map_err(|e| generic(format!("Drive '{node}': {e}")))?;
                    let placement = self
                        .pci
                        .slot_placement(slot)
                        .ok_or_else(|| qmp_error(HotplugError::NoSuchBus(slot.bus())))?;
                    let disk = DiskSpec {
                        key,
                        id,
                        path: backing.path,
                        readonly: backing.readonly,
                        format,
                        image: DiskImage::File(file),
                        node: Some(node),
                    };
                    self.pci
                        .plug_disk(disk, placement, true)
                        .map_err(|e| match e {
                            AddDeviceError::SlotOccupied { port, occupant } => {
                                generic(format!("Slot of {port} is occupied by '{occupant}'"))
                            }
                            e => generic(e.to_string()),
                        })?;
                }
                Action::PressButton { port, id, press } => {
                    let bus = BusId::Port(port).to_string();
                    if let Some(entry) = self.pci.port(port) {
                        lock(&entry.port).press_attention_button();
                    }
                    match press {
                        Press::Request | Press::Repeat => {
                            crate::trace::slot(&bus, "attention-button", json!("pressed"), Some(&id));
                            log::info!("device_del {id}: attention button of {bus} pressed");
                        }
                        Press::Recheck => log::info!(
                            "device_del {id}: the guest was enabling {bus} when asked; attention button pressed again"
                        ),
                    }
                }
                Action::RequestEject {
                    select,
                    device,
                    bus,
                    id,
                } => {
                    let acpi = self
                        .pci
                        .acpi_hotplug()
                        .ok_or_else(|| qmp_error(HotplugError::CannotRemove(id.clone())))?;
                    lock(acpi)
                        .request_eject(select, device)
                        .map_err(|e| generic(e.to_string()))?;
                    let bus = bus.to_string();
                    crate::trace::slot(
                        &bus,
                        "eject-request",
                        json!(format!("{device:02x}.0")),
                        Some(&id),
                    );
                    log::info!(
                        "device_del {id}: ACPI eject request for device {device:#x} of {bus}"
                    );
                }
                Action::Release {
                    id, slot, cause, ..
                } => {
                    if !self.pci.unplug(&id) {
                        log::warn!("{id}: released by the control plane, but no such device");
                        continue;
                    }
                    let bus = slot.bus();
                    let (how, requested) = match cause {
                        ReleaseCause::PoweredOff { requested } => {
                            ("guest powered the slot off".to_string(), requested)
                        }
                        ReleaseCause::Ejected { requested } => (
                            format!("guest ejected device {:#x}", slot.device()),
                            requested,
                        ),
                    };
                    log::info!(
                        "{bus}: {how}; {id} removed{}",
                        if requested { "" } else { " (guest-initiated)" }
                    );
                }
                Action::Pull {
                    key,
                    id,
                    slot,
                    policy,
                } => {
                    let outcome = self
                        .pci
                        .surprise_remove(&id, policy)
                        .ok_or_else(|| QmpError::device_not_found(&id))?;
                    let bus = match slot {
                        SlotId::RootBus(d) => format!("{} slot {d:#x}", BusId::RootBus),
                        SlotId::Port(_) => slot.bus().to_string(),
                    };
                    log::info!("x-surprise-remove {id}: pulled out of {bus}: {outcome:?}");
                    if !outcome.failing {
                        gone.push(key);
                    }
                    done.pulled = Some((policy, outcome));
                }
                Action::ReleasePulled { key, by, .. } => self.pci.release_pulled_disk(key, by),
                Action::Emit(event) => self.emit(event),
                Action::Warn(message) => log::warn!("{message}"),
            }
        }
        let regs = LiveRegisters(&self.pci);
        for key in gone {
            plane
                .control
                .host_event(self.now(), HostEvent::PulledGone { key }, &regs);
        }
        Ok(done)
    }

    fn emit(&self, event: Event) {
        match event {
            Event::DeviceDeleted { id } => self.events.emit(
                "DEVICE_DELETED",
                json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
            ),
            Event::Slot {
                bus,
                slot,
                change,
                device,
            } => {
                let (name, value) = match change {
                    SlotChange::Guest(e) => slot_change(e),
                    SlotChange::Ejected => ("eject", json!("ejected")),
                };
                self.events.emit(
                    "X_HOTPLUG_SLOT",
                    json!({"bus": bus.to_string(), "slot": slot, "change": name, "value": value, "device": device}),
                );
            }
            Event::UnplugStalled {
                id,
                bus,
                seconds,
                diagnosis,
            } => {
                let data = json!({
                    "device": id,
                    "bus": bus.to_string(),
                    "seconds": seconds,
                    "diagnosis": diagnosis,
                });
                log::warn!("unplug stalled: {data}");
                self.events.emit("X_UNPLUG_STALLED", data);
            }
            Event::BackendError {
                id,
                operation,
                error,
                remove,
            } => self.events.emit(
                "X_BACKEND_ERROR",
                json!({
                    "device": id,
                    "operation": operation,
                    "error": error,
                    "action": if remove { "surprise-remove" } else { "report" },
                }),
            ),
        }
    }

    /// `pending` of a slot's x-query-hotplug entry: the removal request of its occupant.
    fn pending_json(&self, plane: &Plane, slot: SlotId, count: &str) -> Value {
        let now = self.now();
        plane
            .control
            .occupant(slot)
            .and_then(|f| f.request())
            .map_or(Value::Null, |r| {
                json!({
                    "request": "unplug",
                    "since-ms": now.saturating_sub(r.since).as_millis() as u64,
                    count: r.requests,
                })
            })
    }

    fn occupant(plane: &Plane, slot: SlotId) -> Option<String> {
        plane.control.occupant(slot).map(|f| f.id.clone())
    }

    /// x-query-hotplug's entries for the root bus's ACPI slots.
    fn acpi_slots_json(&self, plane: &Plane, bus: &AcpiBusState) -> Vec<Value> {
        (0..32u8)
            .filter(|d| bus.hotpluggable & 1 << d != 0)
            .map(|d| {
                let slot = SlotId::RootBus(d);
                let occupant = Self::occupant(plane, slot);
                let mut entry =
                    acpi_slot_json(bus, d, occupant, self.pending_json(plane, slot, "requests"));
                entry["bus"] = json!(BusId::RootBus.to_string());
                entry["slot"] = json!(root_bus_slot_number(d));
                entry
            })
            .collect()
    }

    /// x-query-hotplug's entry for the slot of root port `n` in ACPI mode.
    fn acpi_port_json(
        &self,
        plane: &Plane,
        n: u8,
        port: &PcieRootPort,
        bus: &AcpiBusState,
        select: u8,
    ) -> Value {
        let slot = SlotId::Port(n);
        let occupant = Self::occupant(plane, slot);
        let s = port.slot();
        let mut entry =
            acpi_slot_json(bus, 0, occupant, self.pending_json(plane, slot, "requests"));
        entry["bus"] = json!(BusId::Port(n).to_string());
        entry["slot"] = json!(s.capabilities().physical_slot_number);
        entry["link"] = json!(s.is_link_active());
        entry["bus-select"] = json!(select);
        entry
    }

    fn slot_json(&self, plane: &Plane, n: u8, port: &PcieRootPort) -> Value {
        let slot = port.slot();
        let id = SlotId::Port(n);
        let s = slot.notifications();
        json!({
            "bus": BusId::Port(n).to_string(),
            "slot": slot.capabilities().physical_slot_number,
            "mode": "native",
            "occupant": Self::occupant(plane, id),
            "presence": slot.is_present(),
            "power": slot.is_powered(),
            "link": slot.is_link_active(),
            "power-indicator": slot.power_indicator().to_string(),
            "attention-indicator": slot.attention_indicator().to_string(),
            "armed": slot.is_armed(),
            "msi-enabled": port.msi_enabled(),
            "notifications": {
                "hot-plug-interrupt": s.hot_plug_interrupt,
                "attention-button": s.attention_button,
                "presence-detect": s.presence_detect,
                "command-completed": s.command_completed,
                "link-state": s.link_state,
            },
            "slot-status": slot.slot_status(),
            "pending": self.pending_json(plane, id, "presses"),
        })
    }

    fn query_hotplug(&self) -> Value {
        let mut plane = self.plane();
        self.sync_pulled(&mut plane);
        // Disks pulled out by surprise whose driver has not reset them yet: they fail every
        // request it submits until then.
        // With where their rings stand: a completion the driver never took shows as `used`
        // ahead of `used-event`.
        let rings = self.pci.pulled_rings();
        let pulled: Vec<Value> = plane
            .control
            .pulled()
            .map(|f| {
                let queues: Vec<Value> = rings
                    .iter()
                    .find(|(id, _)| *id == f.id)
                    .map(|(_, r)| {
                        r.iter()
                            .map(|q| {
                                json!({"index": q.index, "avail": q.avail, "used": q.used,
                                       "used-event": q.used_event})
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({"id": f.id, "bus": f.slot.bus().to_string(), "queues": queues})
            })
            .collect();
        let acpi = self.pci.acpi_hotplug();
        let topology = plane.control.topology().clone();
        let mut slots: Vec<Value> = (0..topology.port_count())
            .filter_map(|n| {
                let entry = self.pci.port(n)?;
                let port = lock(&entry.port);
                Some(match (topology.acpi_select(SlotId::Port(n)), acpi) {
                    (Some((select, _)), Some(acpi)) => {
                        let bus = lock(acpi).bus(select).copied().unwrap_or_default();
                        self.acpi_port_json(&plane, n, &port, &bus, select)
                    }
                    _ => self.slot_json(&plane, n, &port),
                })
            })
            .collect();
        if let Some(bus) = acpi.and_then(|a| lock(a).bus(ROOT_BUS_SELECT).copied()) {
            slots.extend(self.acpi_slots_json(&plane, &bus));
        }
        json!({"osc": self.osc_json(), "slots": slots, "pulled": pulled})
    }

    /// What the guest's `_OSC` asked for and was granted: the last evaluation and the last
    /// commit (what the OS controls; `null` if it never committed, e.g. with `pcie_aspm=off`).
    fn osc_json(&self) -> Value {
        let Some(report) = self.pci.osc_report() else {
            return Value::Null;
        };
        let r = lock(report);
        let evaluation = |e: Option<OscEvaluation>| {
            e.map(|e| {
                json!({
                    "query": e.query,
                    "support": e.support,
                    "support-decoded": osc_support_names(e.support),
                    "requested": e.requested,
                    "requested-decoded": osc_control_names(e.requested),
                    "granted": e.granted,
                    "granted-decoded": osc_control_names(e.granted),
                })
            })
        };
        let committed = r.committed();
        json!({
            "evaluations": r.evaluations(),
            "last": evaluation(r.last()),
            "committed": evaluation(committed),
            "native-hotplug-granted": committed.is_some_and(|c| c.granted & platform::osc_report::CTRL_PCIE_NATIVE_HP != 0),
        })
    }
}

/// Opens a `blockdev-add` image: read-write unless `readonly`; anything but a regular file or a
/// block device is refused without waiting on it ([`devices::virtio::block::open_image`]), and
/// so is an image that `format` cannot open (a qcow2 node's header and tables are read here, as
/// QEMU reads them at `blockdev-add`, so that a bad image fails this command and not a later
/// `device_add`).
fn open_backend(path: &Path, readonly: bool, format: ImageFormat) -> Result<File, QmpError> {
    let filename = path.display();
    let file = open_image(path, readonly)
        .map_err(|e| generic(format!("Could not open '{filename}': {e}")))?;
    if format == ImageFormat::Raw {
        return Ok(file);
    }
    file.try_clone()
        .and_then(|f| Disk::from_file_format(f, path, readonly, Some(format)))
        .map(|_| file)
        .map_err(|e| generic(format!("Could not open '{filename}' as {format}: {e}")))
}

/// One ACPI slot's entry of x-query-hotplug (device `d` of `bus`), without its bus and slot
/// number.
fn acpi_slot_json(bus: &AcpiBusState, d: u8, occupant: Option<String>, pending: Value) -> Value {
    json!({
        "addr": format!("{d:02x}.0"),
        "mode": "acpi",
        "occupant": occupant,
        "presence": bus.occupied & 1 << d != 0,
        "insert-pending": bus.insert & 1 << d != 0,
        "eject-request-pending": bus.remove & 1 << d != 0,
        "ejected": bus.ejected & 1 << d != 0,
        "bus-check-pending": bus.vanished & 1 << d != 0,
        // acpiphp evaluates nothing of a slot's until an event: the guest has shown it drives
        // the bus once its event method has read the bus's registers.
        "armed": bus.serviced > 0,
        "events-serviced": bus.serviced,
        "pending": pending,
    })
}

fn decode_bits(value: u32, names: &[(u32, &str)]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .filter(|(bit, _)| value & bit != 0)
        .map(|(_, name)| name.to_string())
        .collect();
    let known = names.iter().fold(0, |acc, (bit, _)| acc | bit);
    if value & !known != 0 {
        out.push(format!("{:#x}", value & !known));
    }
    out
}

fn osc_control_names(value: u32) -> Vec<String> {
    decode_bits(value, &platform::osc_report::CONTROL_NAMES)
}

fn osc_support_names(value: u32) -> Vec<String> {
    decode_bits(value, &platform::osc_report::SUPPORT_NAMES)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(args: Value) -> Result<Command, String> {
        let Value::Object(m) = args else { panic!() };
        blockdev_add_command(&m).map_err(|e| e.desc)
    }

    #[test]
    fn blockdev_add_takes_raw_qcow2_and_file_nodes() {
        let file = json!({"driver": "file", "filename": "/i"});
        for (driver, format) in [("raw", ImageFormat::Raw), ("qcow2", ImageFormat::Qcow2)] {
            let cmd = add(json!({"driver": driver, "node-name": "n", "file": file})).unwrap();
            assert_eq!(
                cmd,
                Command::BlockdevAdd {
                    node: "n".into(),
                    path: "/i".into(),
                    readonly: false,
                    format,
                }
            );
        }
        let cmd =
            add(json!({"driver": "file", "node-name": "n", "filename": "/i", "read-only": true}));
        assert!(matches!(
            cmd,
            Ok(Command::BlockdevAdd {
                format: ImageFormat::Raw,
                readonly: true,
                ..
            })
        ));
        for (bad, needle) in [
            (
                json!({"driver": "qcow2", "node-name": "n", "filename": "/i"}),
                "driver 'qcow2' takes its image as 'file'",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n"}),
                "'file' is missing",
            ),
            (
                json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "nbd", "filename": "/i"}}),
                "only 'file'",
            ),
            (
                json!({"driver": "vmdk", "node-name": "n", "file": file}),
                "supported: raw, qcow2, file",
            ),
        ] {
            let e = add(bad).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_node_is_read_when_it_is_added_and_only_files_are_nodes() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let raw = dir.as_path().join("r.img");
        std::fs::write(&raw, [0u8; 65536]).unwrap();
        let e = open_backend(&raw, false, ImageFormat::Qcow2).unwrap_err();
        assert!(e.desc.starts_with("Could not open"), "{}", e.desc);
        assert!(e.desc.contains("as qcow2"), "{}", e.desc);
        assert!(open_backend(&raw, false, ImageFormat::Raw).is_ok());
        let e = open_backend(dir.as_path(), true, ImageFormat::Raw).unwrap_err();
        assert!(e.desc.contains("is a directory"), "{}", e.desc);
        // A FIFO is refused at once, not waited on (an open of one blocks until a writer comes).
        let fifo = dir.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for readonly in [true, false] {
            let e = open_backend(&fifo, readonly, ImageFormat::Raw).unwrap_err();
            assert!(e.desc.contains("it is a FIFO"), "{}", e.desc);
        }
    }
}
