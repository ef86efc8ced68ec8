//! Hot-plug as the control socket drives it (SPEC.md §5, §6): block backends (`blockdev-add`,
//! `blockdev-del`), disks hot-added into root ports and into the ACPI slots of the root bus
//! (`device_add`), graceful removal through the attention button or an ACPI eject request
//! (`device_del`), and the guest's answers.
//!
//! The guest answers through Slot Control writes, which reach the root port on a vCPU thread,
//! or through its `_EJ0`'s write to the ACPI hot-plug controller's eject register. The port or
//! controller tells its observer — here a channel — and a worker thread does the rest off
//! the vCPU: it reports every slot transition as an `X_HOTPLUG_SLOT` event, removes the device
//! once the guest has powered its slot off (only then is the backend released) and sends
//! `DEVICE_DELETED`, and reports a removal the guest has not answered for
//! [`HotplugOptions::stall_after`] with `X_UNPLUG_STALLED` and a diagnosis read from the slot's
//! registers.
//!
//! `x-surprise-remove` pulls a device out without asking the guest: the requests in flight are
//! failed or dropped ([`InFlightPolicy`]), the device vanishes, the slot reports it (presence
//! and link lost on a native slot, a bus check on an ACPI one) and `DEVICE_DELETED` follows at
//! once.
//!
//! One mutex serializes every hot-plug operation (commands and the worker), so a client never
//! sees a half-added or half-removed device.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use acpi::host_bridge as osc;
use devices::acpi_hotplug::{AcpiBusState, AcpiHotplugController, AcpiHotplugObserver};
use devices::osc_report::OscEvaluation;
use devices::pci::{Bdf, Indicator, PcieRootPort, SlotEvent, SlotObserver};
use devices::virtio::InFlightPolicy;
use serde_json::{json, Map, Value};

use crate::config::parse_backend_error;
use crate::pci_devices::{
    root_bus_slot_number, AddDeviceError, BarReads, DiskSpec, PciDevices, Placement,
    FIRST_ROOT_BUS_SLOT, FIRST_ROOT_PORT_SLOT, ROOT_BUS_SELECT,
};
use crate::qmp::{arg_obj, arg_opt_bool, arg_opt_str, arg_str, check_args, QmpError, QmpEvents};

/// How long a requested removal may go unanswered before `X_UNPLUG_STALLED`, unless
/// configured (Linux's pciehp takes its 5 s grace period plus the driver's teardown).
pub const STALL_AFTER: Duration = Duration::from_secs(15);

/// Hot-plug settings from the command line.
#[derive(Clone, Copy, Debug)]
pub struct HotplugOptions {
    /// How long a `device_del` may go unanswered before `X_UNPLUG_STALLED`.
    pub stall_after: Duration,
    /// What `x-surprise-remove` does with the requests in flight unless the call says.
    pub in_flight: InFlightPolicy,
    /// What a pulled device's BARs read unless the call says.
    pub bar_reads: BarReads,
    /// A disk whose backend fails is pulled out of the guest (as by `x-surprise-remove` with
    /// [`InFlightPolicy::Fail`]) rather than left to answer every request with an I/O error.
    pub remove_on_backend_error: bool,
}

impl Default for HotplugOptions {
    fn default() -> Self {
        HotplugOptions {
            stall_after: STALL_AFTER,
            in_flight: InFlightPolicy::default(),
            bar_reads: BarReads::default(),
            remove_on_backend_error: false,
        }
    }
}
/// A card whose slot the guest powered off is released at the guest's indicator-off command,
/// or after this long without one.
pub const RELEASE_AFTER: Duration = Duration::from_secs(3);
/// How long after the guest finished enabling a slot with a removal pending to check that it
/// took the attention button press.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// A second `device_del` sooner than this after the first, with the guest not yet blinking, is
/// refused: pressing the button again would cancel the first press.
pub const REPRESS_AFTER: Duration = Duration::from_secs(2);
/// The only device model `device_add` knows.
pub const VIRTIO_BLK_PCI: &str = "virtio-blk-pci";

/// A `blockdev-add` node: an open image.
struct Node {
    path: PathBuf,
    readonly: bool,
    file: File,
}

/// The root bus's id.
pub const ROOT_BUS: &str = "pcie.0";

/// A `device_del` the guest has not answered yet.
struct PendingUnplug {
    /// The root port whose slot holds the device, or [`ROOT_BUS`].
    port: String,
    /// ACPI slots: the ACPI hot-plug controller's bus select value of the slot's bus.
    acpi_select: Option<u8>,
    /// ACPI slots: how often the guest's event method had read the bus's events when the
    /// request was made (to tell "never looked" from "looked and did not eject").
    serviced_at_request: u64,
    since: Instant,
    last_press: Instant,
    presses: u32,
    stall_reported: bool,
    /// When to check whether the guest took the press: set when the guest finished enabling
    /// the slot (power indicator on) while the removal was pending.
    recheck_at: Option<Instant>,
}

impl PendingUnplug {
    /// The attention button was pressed again for this removal at `now`.
    fn pressed(&mut self, now: Instant) {
        self.last_press = now;
        self.presses += 1;
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Node>,
    pending: BTreeMap<String, PendingUnplug>,
    /// Occupied slots the guest powered off, by port, until the card is released.
    powered_off: BTreeMap<String, Instant>,
    /// Disks whose backend failure was reported (once per disk).
    backend_failed: std::collections::BTreeSet<String>,
    /// Hot-added disks' `x-backend-error` choice: pulled out when the backend fails.
    backend_removes: BTreeMap<String, bool>,
    /// Native ports whose powered card was pulled out and whose slot the guest has not powered
    /// off since: its pciehp does that as it handles the removal, and that power-off is no
    /// answer of the guest's about a card inserted meanwhile.
    surprised: std::collections::BTreeSet<String>,
}

struct Inner {
    options: HotplugOptions,
    pci: Arc<PciDevices>,
    events: QmpEvents,
    state: Mutex<State>,
}

enum Msg {
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

/// The hot-plug side of the machine. See the module documentation.
pub struct Hotplug {
    inner: Arc<Inner>,
    tx: Sender<Msg>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Hotplug {
    /// Watches every root port of `pci` and reports to the clients of `events`.
    pub fn start(
        pci: Arc<PciDevices>,
        events: QmpEvents,
        options: HotplugOptions,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            options,
            pci,
            events,
            state: Mutex::new(State::default()),
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
                    match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(Msg::Slot(port, event)) => inner.on_slot_event(&port, event),
                        Ok(Msg::AcpiEject(bus, slot)) => inner.on_acpi_eject(bus, slot),
                        Ok(Msg::BackendError(id, op, e)) => inner.on_backend_error(&id, &op, &e),
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    inner.check_stalls();
                    inner.pci.release_reset_pulled();
                })?
        };
        Ok(Hotplug {
            inner,
            tx,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Runs a hot-plug command; `None` if `command` is not one.
    pub fn execute(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let inner = &self.inner;
        Some(match command {
            "blockdev-add" => inner.blockdev_add(args),
            "blockdev-del" => inner.blockdev_del(args),
            "device_add" => inner.device_add(args),
            "device_del" => inner.device_del(args),
            "x-surprise-remove" => inner.surprise_remove(args),
            "x-query-hotplug" => check_args(args, &[]).map(|_| inner.query_hotplug()),
            _ => return None,
        })
    }

    /// The commands [`execute`](Self::execute) runs.
    pub const COMMANDS: &'static [&'static str] = &[
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
        "x-surprise-remove",
        "x-query-hotplug",
    ];
}

impl Hotplug {
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

/// Optional string argument `name`, parsed (`FromStr` errors become the command's error).
fn arg_opt_parsed<T: std::str::FromStr<Err = String>>(
    args: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, QmpError> {
    arg_opt_str(args, name)?
        .map(|v| {
            v.parse()
                .map_err(|e| generic(format!("Parameter '{name}': {e}")))
        })
        .transpose()
}

/// Parses QEMU's `addr` ("5", "0x5", "05.0"): device and function numbers, in hex.
fn parse_addr(addr: &str) -> Result<(u8, u8), QmpError> {
    let (dev, func) = addr.split_once('.').unwrap_or((addr, "0"));
    let parse = |s: &str| {
        let s = s.trim_start_matches("0x");
        u8::from_str_radix(s, 16).ok()
    };
    match (parse(dev), parse(func)) {
        (Some(d), Some(f)) if d < 32 && f < 8 => Ok((d, f)),
        _ => Err(generic(format!(
            "Parameter 'addr' expects a PCI address such as '0' or '00.0', not '{addr}'"
        ))),
    }
}

/// `addr` on a root port: only device 0 (function 0) exists below it.
fn check_port_addr(port: &str, addr: &str) -> Result<(), QmpError> {
    match parse_addr(addr)? {
        (0, 0) => Ok(()),
        _ => Err(generic(format!(
            "addr '{addr}': the slot of root port {port} holds device 0 function 0 only"
        ))),
    }
}

/// `addr` on the root bus: a hot-plug slot's device number, function 0.
fn root_bus_addr(addr: &str) -> Result<u8, QmpError> {
    match parse_addr(addr)? {
        (d, 0) if (FIRST_ROOT_BUS_SLOT..FIRST_ROOT_PORT_SLOT).contains(&d) => Ok(d),
        (d, 0) => Err(generic(format!(
            "addr '{addr}': device {d:#x} of pcie.0 is not a hot-plug slot (slots are {FIRST_ROOT_BUS_SLOT:#x}..{:#x})",
            FIRST_ROOT_PORT_SLOT - 1
        ))),
        _ => Err(generic(format!(
            "addr '{addr}': this VMM hot-plugs function 0 only"
        ))),
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// QEMU's `DEVICE_DELETED` for device `id`.
    fn device_deleted(&self, id: &str) {
        self.events.emit(
            "DEVICE_DELETED",
            json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
        );
    }

    fn blockdev_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        check_args(
            args,
            &["driver", "node-name", "file", "filename", "read-only"],
        )?;
        let driver = arg_str(args, "driver")?;
        let node_name = arg_str(args, "node-name")?;
        let readonly = arg_opt_bool(args, "read-only")?.unwrap_or(false);
        let filename = match driver {
            "raw" => {
                if args.contains_key("filename") {
                    return Err(generic(
                        "driver 'raw' takes its image as 'file': {\"driver\": \"file\", \"filename\": ...}",
                    ));
                }
                let file = arg_obj(args, "file")?;
                check_args(file, &["driver", "filename"])
                    .map_err(|e| generic(format!("file: {}", e.desc)))?;
                let inner_driver =
                    arg_str(file, "driver").map_err(|e| generic(format!("file: {}", e.desc)))?;
                if inner_driver != "file" {
                    return Err(generic(format!(
                        "file: driver '{inner_driver}' is not supported (only 'file')"
                    )));
                }
                arg_str(file, "filename").map_err(|e| generic(format!("file: {}", e.desc)))?
            }
            "file" => {
                if args.contains_key("file") {
                    return Err(generic("driver 'file' takes 'filename', not 'file'"));
                }
                arg_str(args, "filename")?
            }
            other => {
                return Err(generic(format!(
                    "Invalid parameter value for 'driver': '{other}' (supported: raw, file)"
                )))
            }
        };
        if node_name.is_empty()
            || !node_name.starts_with(|c: char| c.is_ascii_alphabetic())
            || !node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(generic(format!(
                "Invalid node-name: '{node_name}' (a letter, then letters, digits, '-', '_', '.')"
            )));
        }
        let mut state = self.state();
        if state.nodes.contains_key(node_name) {
            return Err(generic(format!(
                "Duplicate nodes with node-name='{node_name}'"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(filename)
            .map_err(|e| generic(format!("Could not open '{filename}': {e}")))?;
        match file.metadata() {
            Ok(m) if m.is_dir() => return Err(generic(format!("'{filename}' is a directory"))),
            Ok(_) => {}
            Err(e) => return Err(generic(format!("Could not open '{filename}': {e}"))),
        }
        log::info!("blockdev {node_name}: {filename} (read-only: {readonly})");
        state.nodes.insert(
            node_name.to_string(),
            Node {
                path: PathBuf::from(filename),
                readonly,
                file,
            },
        );
        Ok(json!({}))
    }

    fn blockdev_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        check_args(args, &["node-name"])?;
        let node_name = arg_str(args, "node-name")?;
        let mut state = self.state();
        if !state.nodes.contains_key(node_name) {
            return Err(generic(format!(
                "Failed to find node with node-name='{node_name}'"
            )));
        }
        if let Some(user) = self.pci.node_user(node_name) {
            return Err(generic(format!(
                "Node '{node_name}' is busy: device '{user}' uses it (device_del it first, and wait for DEVICE_DELETED)"
            )));
        }
        state.nodes.remove(node_name);
        log::info!("blockdev {node_name} closed");
        Ok(json!({}))
    }

    fn device_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        check_args(
            args,
            &["driver", "id", "drive", "bus", "addr", "x-backend-error"],
        )?;
        let driver = arg_str(args, "driver")?;
        if driver != VIRTIO_BLK_PCI {
            return Err(generic(format!(
                "'{driver}' is not a valid device model name (this VMM hot-plugs {VIRTIO_BLK_PCI})"
            )));
        }
        let id = arg_str(args, "id")?;
        if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control() || c == '/') {
            return Err(generic(format!("Invalid device id '{id}'")));
        }
        let drive = arg_str(args, "drive")?;
        let bus = arg_opt_str(args, "bus")?;
        let addr = arg_opt_str(args, "addr")?;
        let remove_on_backend_error = match arg_opt_str(args, "x-backend-error")? {
            Some(action) => parse_backend_error(action)
                .map_err(|e| generic(format!("Parameter 'x-backend-error': {e}")))?,
            None => self.options.remove_on_backend_error,
        };

        let mut state = self.state();
        if self.pci.placement(id).is_some() {
            return Err(generic(format!("Duplicate device ID '{id}'")));
        }
        state.backend_failed.remove(id);
        state.backend_removes.remove(id);
        let node = state.nodes.get(drive).ok_or_else(|| {
            generic(format!(
                "Drive '{drive}' not found (add it with blockdev-add first)"
            ))
        })?;
        if let Some(user) = self.pci.node_user(drive) {
            return Err(generic(format!(
                "Drive '{drive}' is already in use by device '{user}'"
            )));
        }
        let file = node
            .file
            .try_clone()
            .map_err(|e| generic(format!("Drive '{drive}': {e}")))?;
        let disk = DiskSpec {
            id: id.to_string(),
            path: node.path.clone(),
            readonly: node.readonly,
            file: Some(file),
            node: Some(drive.to_string()),
        };
        let placement = match bus {
            Some(ROOT_BUS) => Placement::RootBus(self.root_bus_slot(addr)?),
            Some(bus) => {
                if self.pci.root_port(bus).is_none() {
                    return Err(generic(format!("Bus '{bus}' not found")));
                }
                self.port_placement(bus, addr)?
            }
            None => {
                let port = self
                    .pci
                    .root_ports()
                    .find(|(id, e)| {
                        self.pci.port_occupant(id).is_none() && !lock(&e.port).slot().is_present()
                    })
                    .map(|(id, _)| id.clone())
                    .ok_or_else(|| generic("No free root port slot for the device"))?;
                self.port_placement(&port, addr)?
            }
        };
        self.check_acpi_slot_settled(&placement)?;
        self.pci
            .plug_disk(disk, placement, true)
            .map_err(|e| match e {
                AddDeviceError::SlotOccupied { port, occupant } => {
                    generic(format!("Slot of {port} is occupied by '{occupant}'"))
                }
                e => generic(e.to_string()),
            })?;
        state
            .backend_removes
            .insert(id.to_string(), remove_on_backend_error);
        drop(state);
        Ok(json!({}))
    }

    /// Refuses an ACPI slot whose last device vanished (surprise removal) while the guest has
    /// not read the bus check yet: a device inserted now would look to acpiphp like the one it
    /// still has.
    fn check_acpi_slot_settled(&self, placement: &Placement) -> Result<(), QmpError> {
        let (Some((select, device)), Some(acpi)) =
            (self.pci.acpi_slot(placement), self.pci.acpi_hotplug())
        else {
            return Ok(());
        };
        let vanished = lock(acpi).bus(select).map_or(0, |b| b.vanished);
        if vanished & 1 << device != 0 {
            let bus = match placement {
                Placement::RootBus(_) => ROOT_BUS,
                Placement::Port { port, .. } => port.as_str(),
            };
            return Err(generic(format!(
                "Slot {device:#x} of {bus}: the guest has not yet taken notice of the surprise removal of its last device; retry shortly"
            )));
        }
        Ok(())
    }

    fn port_placement(&self, port: &str, addr: Option<&str>) -> Result<Placement, QmpError> {
        if let Some(addr) = addr {
            check_port_addr(port, addr)?;
        }
        let entry = self.pci.root_port(port).expect("callers checked the port");
        Ok(Placement::Port {
            port: port.to_string(),
            port_bdf: entry.bdf,
        })
    }

    /// The root bus slot for a `device_add`: `addr`'s, or the first free one.
    fn root_bus_slot(&self, addr: Option<&str>) -> Result<Bdf, QmpError> {
        let acpi = self
            .pci
            .acpi_hotplug()
            .ok_or_else(|| generic("Bus 'pcie.0' does not support hotplugging"))?;
        let busy = lock(acpi)
            .bus(ROOT_BUS_SELECT)
            .map(|b| b.occupied | b.vanished)
            .unwrap_or(u32::MAX);
        let device = match addr {
            Some(addr) => root_bus_addr(addr)?,
            None => (FIRST_ROOT_BUS_SLOT..FIRST_ROOT_PORT_SLOT)
                .find(|d| busy & 1 << d == 0 && self.pci.root_bus_occupant(*d).is_none())
                .ok_or_else(|| generic("No free slot on bus 'pcie.0' for the device"))?,
        };
        Ok(Bdf::new(0, device, 0).expect("device < 32"))
    }

    fn device_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        check_args(args, &["id"])?;
        let id = arg_str(args, "id")?;
        let mut state = self.state();
        let placement = self
            .pci
            .placement(id)
            .ok_or_else(|| QmpError::device_not_found(id))?;
        let port = match placement {
            Placement::RootBus(bdf) => {
                return self.acpi_eject_request(
                    &mut state,
                    id,
                    ROOT_BUS,
                    ROOT_BUS_SELECT,
                    bdf.device(),
                )
            }
            Placement::Port { port, .. } => port,
        };
        let entry = self.pci.root_port(&port).expect("placement names a port");
        if let Some(select) = entry.acpi_select {
            return self.acpi_eject_request(&mut state, id, &port, select, 0);
        }
        let mut p = lock(&entry.port);
        if p.slot().power_indicator() == Indicator::Blinking {
            return Err(generic(format!(
                "Hot-unplug of '{id}' refused: guest is busy (power indicator of {port} blinking)"
            )));
        }
        let now = Instant::now();
        if let Some(pending) = state.pending.get_mut(id) {
            let ago = now.duration_since(pending.last_press);
            if ago < REPRESS_AFTER {
                return Err(generic(format!(
                    "device_del of '{id}' already requested {} ms ago; waiting for the guest",
                    ago.as_millis()
                )));
            }
            pending.pressed(now);
        } else {
            state.pending.insert(
                id.to_string(),
                PendingUnplug {
                    port: port.clone(),
                    acpi_select: None,
                    serviced_at_request: 0,
                    since: now,
                    last_press: now,
                    presses: 1,
                    stall_reported: false,
                    recheck_at: None,
                },
            );
        }
        p.press_attention_button();
        crate::trace::slot(&port, "attention-button", json!("pressed"), Some(id));
        log::info!("device_del {id}: attention button of {port} pressed");
        Ok(json!({}))
    }

    /// `x-surprise-remove {"id", "in-flight"?}`: the device is gone at once (see
    /// [`PciDevices::surprise_remove`]); a removal the guest was asked for is forgotten, and
    /// `DEVICE_DELETED` follows.
    fn surprise_remove(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        check_args(args, &["id", "in-flight", "bar-reads"])?;
        let id = arg_str(args, "id")?;
        let in_flight = arg_opt_parsed(args, "in-flight")?.unwrap_or(self.options.in_flight);
        let bar_reads = arg_opt_parsed(args, "bar-reads")?.unwrap_or(self.options.bar_reads);
        let mut state = self.state();
        self.pull_out(&mut state, id, in_flight, bar_reads)
    }

    /// Pulls `id` out of its slot without asking the guest; `DEVICE_DELETED` follows.
    fn pull_out(
        &self,
        state: &mut State,
        id: &str,
        in_flight: InFlightPolicy,
        bar_reads: BarReads,
    ) -> Result<Value, QmpError> {
        let placement = self
            .pci
            .placement(id)
            .ok_or_else(|| QmpError::device_not_found(id))?;
        let bus = match &placement {
            Placement::RootBus(bdf) => {
                if self.pci.acpi_hotplug().is_none() {
                    return Err(generic(format!(
                        "Bus '{ROOT_BUS}' does not support hotplugging: '{id}' cannot be removed"
                    )));
                }
                format!("{ROOT_BUS} slot {:#x}", bdf.device())
            }
            Placement::Port { port, .. } => {
                state.powered_off.remove(port);
                if let Some(entry) = self.pci.root_port(port) {
                    let p = lock(&entry.port);
                    if entry.acpi_select.is_none() && p.slot().is_powered() {
                        state.surprised.insert(port.clone());
                    }
                }
                port.clone()
            }
        };
        state.pending.remove(id);
        state.backend_failed.remove(id);
        let outcome = self
            .pci
            .surprise_remove(id, in_flight, bar_reads)
            .ok_or_else(|| QmpError::device_not_found(id))?;
        log::info!("x-surprise-remove {id}: pulled out of {bus}: {outcome:?}");
        self.device_deleted(id);
        Ok(json!({
            "in-flight": in_flight.name(),
            "bar-reads": bar_reads.name(),
            "failed": outcome.failed,
            "dropped": outcome.dropped,
            "host-io-pending": outcome.host_io_pending,
        }))
    }

    /// Disk `id`'s backing file failed `op` with `error`: reported once per disk with
    /// `X_BACKEND_ERROR`; with [`HotplugOptions::remove_on_backend_error`] the disk is pulled
    /// out of the guest.
    fn on_backend_error(&self, id: &str, op: &str, error: &str) {
        let mut state = self.state();
        if self.pci.placement(id).is_none() || !state.backend_failed.insert(id.to_string()) {
            return;
        }
        let remove = state
            .backend_removes
            .get(id)
            .copied()
            .unwrap_or(self.options.remove_on_backend_error);
        self.events.emit(
            "X_BACKEND_ERROR",
            json!({
                "device": id,
                "operation": op,
                "error": error,
                "action": if remove { "surprise-remove" } else { "report" },
            }),
        );
        if remove {
            let bar_reads = self.options.bar_reads;
            if let Err(e) = self.pull_out(&mut state, id, InFlightPolicy::Fail, bar_reads) {
                log::warn!("{id}: backend failed, cannot pull it out: {}", e.desc);
            }
        }
    }

    /// `device_del` of a device in an ACPI slot (device `device` of `bus`, whose bus select is
    /// `select`): an ACPI eject request, repeated if asked again after [`REPRESS_AFTER`].
    fn acpi_eject_request(
        &self,
        state: &mut State,
        id: &str,
        bus: &str,
        select: u8,
        device: u8,
    ) -> Result<Value, QmpError> {
        let acpi = self.pci.acpi_hotplug().ok_or_else(|| {
            generic(format!(
                "Bus '{bus}' does not support hotplugging: '{id}' cannot be removed"
            ))
        })?;
        let mut c = lock(acpi);
        let now = Instant::now();
        let serviced = c.bus(select).map_or(0, |b| b.serviced);
        if let Some(pending) = state.pending.get_mut(id) {
            let ago = now.duration_since(pending.last_press);
            if ago < REPRESS_AFTER {
                return Err(generic(format!(
                    "device_del of '{id}' already requested {} ms ago; waiting for the guest",
                    ago.as_millis()
                )));
            }
            c.request_eject(select, device)
                .map_err(|e| generic(e.to_string()))?;
            pending.pressed(now);
        } else {
            c.request_eject(select, device)
                .map_err(|e| generic(e.to_string()))?;
            state.pending.insert(
                id.to_string(),
                PendingUnplug {
                    port: bus.to_string(),
                    acpi_select: Some(select),
                    serviced_at_request: serviced,
                    since: now,
                    last_press: now,
                    presses: 1,
                    stall_reported: false,
                    recheck_at: None,
                },
            );
        }
        crate::trace::slot(
            bus,
            "eject-request",
            json!(format!("{device:02x}.0")),
            Some(id),
        );
        log::info!("device_del {id}: ACPI eject request for device {device:#x} of {bus}");
        Ok(json!({}))
    }

    /// The guest's `_EJ0` ejected device `device` of ACPI hot-plug bus `bus`: it has let go
    /// of it, so the device goes now, its backend with it.
    fn on_acpi_eject(&self, bus: u8, device: u8) {
        let mut state = self.state();
        let (bus_name, slot_number, occupant) = if bus == ROOT_BUS_SELECT {
            (
                ROOT_BUS.to_string(),
                root_bus_slot_number(device),
                self.pci.root_bus_occupant(device),
            )
        } else {
            let Some((port, entry)) = self.pci.port_by_select(bus).filter(|_| device == 0) else {
                return;
            };
            let number = lock(&entry.port).slot().capabilities().physical_slot_number;
            (
                port.clone(),
                u32::from(number),
                self.pci.port_occupant(port),
            )
        };
        self.events.emit(
            "X_HOTPLUG_SLOT",
            json!({"bus": bus_name, "slot": slot_number, "change": "eject",
                   "value": "ejected", "device": occupant}),
        );
        let Some(id) = occupant else {
            return;
        };
        let requested = state.pending.remove(&id).is_some();
        if self.pci.unplug(&id) {
            log::info!(
                "{bus_name}: guest ejected device {device:#x}; {id} removed{}",
                if requested { "" } else { " (guest-initiated)" }
            );
            self.device_deleted(&id);
        }
    }

    /// x-query-hotplug's entries for the root bus's ACPI slots.
    fn acpi_slots_json(&self, c: &AcpiHotplugController, state: &State) -> Vec<Value> {
        let Some(bus) = c.bus(ROOT_BUS_SELECT) else {
            return Vec::new();
        };
        (0..32u8)
            .filter(|d| bus.hotpluggable & 1 << d != 0)
            .map(|d| {
                let occupant = self.pci.root_bus_occupant(d);
                let mut slot = acpi_slot_json(bus, d, occupant.as_deref(), state);
                slot["bus"] = json!(ROOT_BUS);
                slot["slot"] = json!(root_bus_slot_number(d));
                slot
            })
            .collect()
    }

    /// x-query-hotplug's entry for the slot of root port `port_id` in ACPI mode.
    fn acpi_port_json(
        &self,
        port_id: &str,
        port: &PcieRootPort,
        c: &AcpiHotplugController,
        select: u8,
        state: &State,
    ) -> Value {
        let occupant = self.pci.port_occupant(port_id);
        let bus = c.bus(select).copied().unwrap_or_default();
        let slot = port.slot();
        let mut entry = acpi_slot_json(&bus, 0, occupant.as_deref(), state);
        entry["bus"] = json!(port_id);
        entry["slot"] = json!(slot.capabilities().physical_slot_number);
        entry["link"] = json!(slot.is_link_active());
        entry["bus-select"] = json!(select);
        entry
    }

    fn slot_json(&self, port_id: &str, port: &PcieRootPort, state: &State) -> Value {
        let slot = port.slot();
        let occupant = self.pci.port_occupant(port_id);
        let pending = occupant
            .as_ref()
            .and_then(|id| state.pending.get(id))
            .map(|p| {
                json!({
                    "request": "unplug",
                    "since-ms": p.since.elapsed().as_millis() as u64,
                    "presses": p.presses,
                })
            });
        let n = slot.notifications();
        json!({
            "bus": port_id,
            "slot": slot.capabilities().physical_slot_number,
            "mode": "native",
            "occupant": occupant,
            "presence": slot.is_present(),
            "power": slot.is_powered(),
            "link": slot.is_link_active(),
            "power-indicator": slot.power_indicator().to_string(),
            "attention-indicator": slot.attention_indicator().to_string(),
            "armed": slot.is_armed(),
            "msi-enabled": port.msi_enabled(),
            "notifications": {
                "hot-plug-interrupt": n.hot_plug_interrupt,
                "attention-button": n.attention_button,
                "presence-detect": n.presence_detect,
                "command-completed": n.command_completed,
                "link-state": n.link_state,
            },
            "slot-status": slot.slot_status(),
            "pending": pending,
        })
    }

    fn query_hotplug(&self) -> Value {
        // Disks pulled out by surprise whose driver has not reset them yet: they fail every
        // request it submits until then.
        let pulled: Vec<Value> = self
            .pci
            .pulled_failing()
            .into_iter()
            .map(|(id, bus)| json!({"id": id, "bus": bus}))
            .collect();
        let state = self.state();
        let acpi = self.pci.acpi_hotplug();
        let mut slots: Vec<Value> = self
            .pci
            .root_ports()
            .map(|(id, e)| match (e.acpi_select, acpi) {
                (Some(select), Some(acpi)) => {
                    self.acpi_port_json(id, &lock(&e.port), &lock(acpi), select, &state)
                }
                _ => self.slot_json(id, &lock(&e.port), &state),
            })
            .collect();
        if let Some(acpi) = acpi {
            slots.extend(self.acpi_slots_json(&lock(acpi), &state));
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
            "native-hotplug-granted": committed.is_some_and(|c| c.granted & osc::OSC_CTRL_PCIE_NATIVE_HP != 0),
        })
    }

    /// A guest Slot Control command did `event` on `port_id`.
    fn on_slot_event(&self, port_id: &str, event: SlotEvent) {
        let mut state = self.state();
        let Some(entry) = self.pci.root_port(port_id) else {
            return;
        };
        let slot_number = lock(&entry.port).slot().capabilities().physical_slot_number;
        let occupant = self.pci.port_occupant(port_id);
        let (name, value) = slot_change(event);
        self.events.emit(
            "X_HOTPLUG_SLOT",
            json!({"bus": port_id, "slot": slot_number, "change": name, "value": value, "device": occupant}),
        );
        match event {
            // The guest's answer to a surprise removal, not to the card inserted since.
            SlotEvent::PowerOff if state.surprised.remove(port_id) => {}
            SlotEvent::PowerOff if occupant.is_some() => {
                state
                    .powered_off
                    .insert(port_id.to_string(), Instant::now());
            }
            SlotEvent::PowerOn => {
                state.powered_off.remove(port_id);
            }
            SlotEvent::PowerIndicator(Indicator::Off)
                if state.powered_off.contains_key(port_id) =>
            {
                self.release_card(&mut state, port_id);
            }
            SlotEvent::PowerIndicator(Indicator::On) => {
                // The guest finished bringing the slot up. A press that came while it was doing
                // so is ignored by pciehp ("invalid state"): look again shortly, and press again
                // if the guest is not blinking by then.
                if let Some(p) = occupant.as_ref().and_then(|id| state.pending.get_mut(id)) {
                    p.recheck_at = Some(Instant::now() + RECHECK_AFTER);
                }
            }
            _ => {}
        }
    }

    /// The guest has let go of the card in `port_id` and finished powering the slot down: now
    /// the device goes, and its backend with it.
    ///
    /// Linux's pciehp powers the slot off, waits a second, discards the link and presence
    /// changes that came meanwhile, then turns the power indicator off. Releasing the card at
    /// the indicator-off command (as QEMU does) means a card inserted right after
    /// `DEVICE_DELETED` is never mistaken by the guest for an effect of its own power-off.
    fn release_card(&self, state: &mut State, port_id: &str) {
        state.powered_off.remove(port_id);
        let Some(id) = self.pci.port_occupant(port_id) else {
            return;
        };
        let requested = state.pending.remove(&id).is_some();
        if self.pci.unplug(&id) {
            log::info!(
                "{port_id}: guest powered the slot off; {id} removed{}",
                if requested { "" } else { " (guest-initiated)" }
            );
            self.device_deleted(&id);
        }
    }

    /// Releases cards whose slot the guest powered off [`RELEASE_AFTER`] ago without turning the
    /// power indicator off; reports removals the guest has not answered for [`STALL_AFTER`],
    /// once each.
    fn check_stalls(&self) {
        let mut state = self.state();
        let overdue: Vec<String> = state
            .powered_off
            .iter()
            .filter(|(_, since)| since.elapsed() >= RELEASE_AFTER)
            .map(|(port, _)| port.clone())
            .collect();
        for port in overdue {
            self.release_card(&mut state, &port);
        }
        for (id, p) in state.pending.iter_mut() {
            if p.acpi_select.is_some() || p.recheck_at.is_none_or(|t| t > Instant::now()) {
                continue;
            }
            p.recheck_at = None;
            let Some(entry) = self.pci.root_port(&p.port) else {
                continue;
            };
            let mut port = lock(&entry.port);
            let slot = port.slot();
            let ignored = slot.is_powered()
                && slot.power_indicator() == Indicator::On
                && slot.status_events() & devices::pci::slot::SLTSTA_ABP == 0;
            if ignored {
                port.press_attention_button();
                p.pressed(Instant::now());
                log::info!(
                    "device_del {id}: the guest was enabling {} when asked; attention button pressed again",
                    p.port
                );
            }
        }
        let pci = &self.pci;
        let mut stalled = Vec::new();
        for (id, p) in state.pending.iter_mut() {
            if p.stall_reported || p.since.elapsed() < self.options.stall_after {
                continue;
            }
            p.stall_reported = true;
            let diagnosis = if let (Some(select), Some(acpi)) = (p.acpi_select, pci.acpi_hotplug())
            {
                let serviced = lock(acpi).bus(select).map_or(0, |b| b.serviced);
                diagnose_acpi(&p.port, serviced > p.serviced_at_request)
            } else if let Some(entry) = pci.root_port(&p.port) {
                diagnose(&p.port, &lock(&entry.port))
            } else {
                continue;
            };
            stalled.push(json!({
                "device": id,
                "bus": p.port,
                "seconds": p.since.elapsed().as_secs(),
                "diagnosis": diagnosis,
            }));
        }
        drop(state);
        for data in stalled {
            log::warn!("unplug stalled: {data}");
            self.events.emit("X_UNPLUG_STALLED", data);
        }
    }
}

/// Why the guest has not answered an attention button press on `port_id`, from what its
/// registers say the guest did.
pub fn diagnose(port_id: &str, port: &PcieRootPort) -> String {
    let slot = port.slot();
    let n = slot.notifications();
    if !n.hot_plug_interrupt {
        return format!(
            "guest pciehp never enabled hot-plug interrupts on {port_id}: driver not bound — check _OSC negotiation or kernel parameters such as pcie_aspm=off"
        );
    }
    if !n.attention_button {
        return format!(
            "guest enabled hot-plug interrupts on {port_id} but not the attention button: its driver does not handle button presses"
        );
    }
    if !port.msi_enabled() {
        return format!(
            "guest armed {port_id} but never enabled its MSI: the button press interrupt cannot be delivered"
        );
    }
    if slot.status_events() & devices::pci::slot::SLTSTA_ABP != 0 {
        return format!(
            "guest has not acknowledged the attention button on {port_id} (Attention Button Pressed still set): its interrupt handler did not run"
        );
    }
    match slot.power_indicator() {
        Indicator::Blinking => format!(
            "guest acknowledged the button on {port_id} and blinks the power indicator, but has not powered the slot off: its driver is still letting go of the device"
        ),
        _ => format!(
            "guest acknowledged the button on {port_id} but kept the slot powered: the press was cancelled (a second press within 5 s) or the guest refused the removal"
        ),
    }
}

/// Why the guest has not ejected an ACPI slot of `bus` it was asked to: `looked` says whether
/// its event method read the eject request.
pub fn diagnose_acpi(bus: &str, looked: bool) -> String {
    if looked {
        format!("guest read the ACPI eject request for {bus} but never evaluated the slot's _EJ0: acpiphp did not take the request (slot not registered, or the driver refused to let go of the device)")
    } else {
        format!("guest never read the ACPI eject request for {bus}: its Generic Event Device handler did not run (ACPI0013 not bound, or its interrupt not delivered)")
    }
}

/// One ACPI slot's entry of x-query-hotplug (device `d` of `bus`), without its bus and slot
/// number.
fn acpi_slot_json(bus: &AcpiBusState, d: u8, occupant: Option<&str>, state: &State) -> Value {
    let pending = occupant.and_then(|id| state.pending.get(id)).map(|p| {
        json!({
            "request": "unplug",
            "since-ms": p.since.elapsed().as_millis() as u64,
            "requests": p.presses,
        })
    });
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

/// `_OSC` control field bits (PCI Firmware Specification 3.3 §4.5.1), as Linux names them.
const OSC_CONTROL_NAMES: [(u32, &str); 7] = [
    (osc::OSC_CTRL_PCIE_NATIVE_HP, "PCIeHotplug"),
    (osc::OSC_CTRL_SHPC_NATIVE_HP, "SHPCHotplug"),
    (osc::OSC_CTRL_PCIE_PME, "PME"),
    (osc::OSC_CTRL_PCIE_AER, "AER"),
    (osc::OSC_CTRL_PCIE_CAPABILITY, "PCIeCapability"),
    (osc::OSC_CTRL_LTR, "LTR"),
    (osc::OSC_CTRL_DPC, "DPC"),
];
/// `_OSC` support field bits, as Linux names them.
const OSC_SUPPORT_NAMES: [(u32, &str); 8] = [
    (1 << 0, "ExtendedConfig"),
    (1 << 1, "ASPM"),
    (1 << 2, "ClockPM"),
    (1 << 3, "Segments"),
    (1 << 4, "MSI"),
    (1 << 5, "HPX-Type3"),
    (1 << 6, "EDR"),
    (1 << 8, "HotplugEventSupport"),
];

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
    decode_bits(value, &OSC_CONTROL_NAMES)
}

fn osc_support_names(value: u32) -> Vec<String> {
    decode_bits(value, &OSC_SUPPORT_NAMES)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_bus_addresses() {
        assert_eq!(root_bus_addr("5").unwrap(), 5);
        assert_eq!(root_bus_addr("0x0f").unwrap(), 15);
        assert_eq!(root_bus_addr("0a.0").unwrap(), 10);
        for bad in ["0", "10", "1f.0", "5.1", "zz", "", "20"] {
            assert!(root_bus_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn port_addresses() {
        for ok in ["0", "00", "0.0", "00.0", "0x0"] {
            assert!(check_port_addr("rp0", ok).is_ok(), "{ok}");
        }
        for bad in ["1", "0.1", "1f.0", "zz", "", "0.x"] {
            assert!(check_port_addr("rp0", bad).is_err(), "{bad}");
        }
    }
}
