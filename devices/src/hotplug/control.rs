//! [`HotplugControl`]: the hot-plug control plane as a pure state machine. See the
//! [module documentation](super) for the rules it keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use super::action::{Action, Event, Press, PulledRelease, ReleaseCause, SlotChange};
use super::command::{Command, DeviceAdd, GuestEvent, HostEvent};
use super::diagnosis;
use super::error::HotplugError;
use super::function::{Backing, Function, FunctionKey, Lifecycle, UnplugRequest};
use super::policy::{BarReads, InFlightPolicy, PortMode, SurprisePolicy};
use super::registers::SlotRegisters;
use super::topology::{BusId, DeviceAddr, SlotId, Topology, FIRST_ROOT_BUS_SLOT};
use crate::pci::{Indicator, SlotEvent};
use crate::virtio::block::ImageFormat;

/// How long a requested removal may go unanswered before `X_UNPLUG_STALLED`, unless
/// configured (Linux's pciehp takes its 5 s grace period plus the driver's teardown).
pub const STALL_AFTER: Duration = Duration::from_secs(15);
/// A card whose slot the guest powered off is released at the guest's indicator-off command,
/// or after this long without one.
pub const RELEASE_AFTER: Duration = Duration::from_secs(3);
/// How long after the guest finished enabling a slot with a removal pending to check that it
/// took the attention button press.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// A second `device_del` sooner than this after the last one is refused: pressing the button
/// again would cancel the first press (pciehp cancels within its 5 s grace period).
pub const REPRESS_AFTER: Duration = Duration::from_secs(2);

/// How long after a surprise removal from an ACPI slot a new card waits for the guest's driver
/// to let go of the pulled one (see `check_slot_free`).
pub const ACPI_PULL_SETTLE: Duration = Duration::from_secs(10);

/// The control plane's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// How long a `device_del` may go unanswered before `X_UNPLUG_STALLED`.
    pub stall_after: Duration,
    /// See [`RELEASE_AFTER`].
    pub release_after: Duration,
    /// See [`RECHECK_AFTER`].
    pub recheck_after: Duration,
    /// See [`REPRESS_AFTER`].
    pub repress_after: Duration,
    /// What `x-surprise-remove` does unless the command says.
    pub surprise: SurprisePolicy,
    /// A disk whose backend fails is pulled out of the guest (policy `fail`) rather than left to
    /// answer every request with an I/O error, unless its `device_add` said otherwise.
    pub remove_on_backend_error: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            stall_after: STALL_AFTER,
            release_after: RELEASE_AFTER,
            recheck_after: RECHECK_AFTER,
            repress_after: REPRESS_AFTER,
            surprise: SurprisePolicy::default(),
            remove_on_backend_error: false,
        }
    }
}

/// A `blockdev-add` node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// The image.
    pub path: PathBuf,
    /// Opened read-only.
    pub readonly: bool,
    /// Its format (raw in snapshots made before qcow2 was supported).
    #[serde(default)]
    pub format: ImageFormat,
}

/// The hot-plug control plane: every backend node and every function with its lifecycle, in
/// one place, and the rules that move them. Pure: no clock (every input carries `now`, the
/// time since an origin the caller picks), no threads, no I/O; the guest's side of the slots
/// is read through [`SlotRegisters`].
///
/// `Clone` and `PartialEq` are part of the contract: a VMM saves a copy before a command and
/// restores it if carrying out the answer fails, and tests compare states.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HotplugControl {
    topology: Topology,
    options: Options,
    nodes: BTreeMap<String, Node>,
    functions: BTreeMap<FunctionKey, Function>,
    next_key: u64,
    /// Native ports whose powered card was pulled out and whose slot the guest has not powered
    /// off since: pciehp powers it off as it handles the removal, and that power-off is no
    /// answer of the guest's about a card inserted meanwhile.
    surprised_ports: BTreeSet<u8>,
}

impl HotplugControl {
    /// A control plane for the machine `topology`, with no nodes and no functions.
    pub fn new(topology: Topology, options: Options) -> Self {
        HotplugControl {
            topology,
            options,
            nodes: BTreeMap::new(),
            functions: BTreeMap::new(),
            next_key: 0,
            surprised_ports: BTreeSet::new(),
        }
    }

    // ---- What it holds ----

    /// The machine.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The settings.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Replaces the settings, as a VMM restoring a snapshot does with its own: they are the
    /// VMM's policies, not the machine's. What was decided under the old ones stays decided
    /// (a device pulled keeps the policy it was pulled with; an unplug keeps its age, and the
    /// new `stall_after` applies to it from now on).
    pub fn set_options(&mut self, options: Options) {
        self.options = options;
    }

    /// Every `blockdev-add` node, by name.
    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    /// Every function it manages, pulled ones included, in the order they were added.
    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.functions.values()
    }

    /// The functions in their slots as the control socket sees them (what `query-block`,
    /// `query-pci` and `x-query-hotplug` list): every one but the pulled ones.
    pub fn attached(&self) -> impl Iterator<Item = &Function> {
        self.functions.values().filter(|f| f.is_attached())
    }

    /// The pulled-out functions whose device may still fail its driver's requests.
    pub fn pulled(&self) -> impl Iterator<Item = &Function> {
        self.functions.values().filter(|f| !f.is_attached())
    }

    /// Function `key`, if it is still managed.
    pub fn function(&self, key: FunctionKey) -> Option<&Function> {
        self.functions.get(&key)
    }

    /// The attached function with id `id`.
    pub fn device(&self, id: &str) -> Option<&Function> {
        self.attached().find(|f| f.id == id)
    }

    /// The attached function in `slot`.
    pub fn occupant(&self, slot: SlotId) -> Option<&Function> {
        self.attached().find(|f| f.slot == slot)
    }

    /// The attached function using node `node`.
    pub fn node_user(&self, node: &str) -> Option<&Function> {
        self.attached()
            .find(|f| f.backing.node.as_deref() == Some(node))
    }

    // ---- Inputs ----

    /// Records a disk present before the guest runs (`--disk`), in `slot`.
    pub fn cold_plug(
        &mut self,
        id: &str,
        slot: SlotId,
        path: PathBuf,
        readonly: bool,
    ) -> Result<FunctionKey, HotplugError> {
        if self.device(id).is_some() {
            return Err(HotplugError::DuplicateId(id.to_string()));
        }
        if !self.topology.has_bus(slot.bus()) {
            return Err(HotplugError::NoSuchBus(slot.bus()));
        }
        if let Some(f) = self.occupant(slot) {
            return Err(HotplugError::SlotOccupied {
                slot: slot_name(slot),
                occupant: f.id.clone(),
            });
        }
        Ok(self.add_function(
            id,
            slot,
            Backing {
                node: None,
                path,
                readonly,
            },
            self.options.remove_on_backend_error,
        ))
    }

    /// Runs a control-socket command at `now`: the actions to carry out, or why it was refused
    /// (and then nothing changed).
    pub fn command(
        &mut self,
        now: Duration,
        command: Command,
        regs: &dyn SlotRegisters,
    ) -> Result<Vec<Action>, HotplugError> {
        match command {
            Command::BlockdevAdd {
                node,
                path,
                readonly,
                format,
            } => self.blockdev_add(node, path, readonly, format),
            Command::BlockdevDel { node } => self.blockdev_del(&node),
            Command::DeviceAdd(add) => self.device_add(now, add, regs),
            Command::DeviceDel { id } => self.device_del(now, &id, regs),
            Command::SurpriseRemove {
                id,
                in_flight,
                bar_reads,
            } => self.surprise_remove(now, &id, in_flight, bar_reads, regs),
        }
    }

    /// Something the guest did, at `now`.
    pub fn guest_event(&mut self, now: Duration, event: GuestEvent) -> Vec<Action> {
        match event {
            GuestEvent::SlotControl { port, event } => self.on_slot_control(now, port, event),
            GuestEvent::Eject { select, device } => self.on_eject(select, device),
            GuestEvent::DriverReset { key } => match self.functions.get(&key) {
                Some(f) if !f.is_attached() => {
                    let f = self.functions.remove(&key).expect("just found");
                    vec![Action::ReleasePulled {
                        key,
                        id: f.id,
                        slot: f.slot,
                        by: PulledRelease::DriverReset,
                    }]
                }
                _ => Vec::new(),
            },
        }
    }

    /// Something the host saw, at `now`.
    pub fn host_event(
        &mut self,
        now: Duration,
        event: HostEvent,
        regs: &dyn SlotRegisters,
    ) -> Vec<Action> {
        match event {
            HostEvent::BackendFailed {
                id,
                operation,
                error,
            } => self.on_backend_failed(now, &id, operation, error, regs),
            HostEvent::PulledGone { key } => {
                if self.functions.get(&key).is_some_and(|f| !f.is_attached()) {
                    self.functions.remove(&key);
                }
                Vec::new()
            }
        }
    }

    /// Time has passed: releases cards whose slot the guest powered off a while ago without
    /// turning the power indicator off, presses again where the guest ignored a press while
    /// enabling the slot, and reports removals left unanswered, once each.
    pub fn tick(&mut self, now: Duration, regs: &dyn SlotRegisters) -> Vec<Action> {
        let mut actions = Vec::new();
        let overdue: Vec<FunctionKey> = self
            .functions
            .values()
            .filter(|f| {
                matches!(f.lifecycle, Lifecycle::PoweredOff { since, .. }
                    if now.saturating_sub(since) >= self.options.release_after)
            })
            .map(|f| f.key)
            .collect();
        for key in overdue {
            self.release_powered_off(key, &mut actions);
        }
        for f in self.functions.values_mut() {
            let SlotId::Port(port) = f.slot else {
                continue;
            };
            if self.topology.port_mode(port) != Some(PortMode::Native) {
                continue;
            }
            let Lifecycle::UnplugRequested(r) = &mut f.lifecycle else {
                continue;
            };
            if r.recheck_at.is_none_or(|t| t > now) {
                continue;
            }
            r.recheck_at = None;
            let Some(view) = regs.port_slot(port) else {
                continue;
            };
            if view.powered && view.power_indicator == Indicator::On && !view.attention_pressed {
                r.last_request = now;
                r.requests += 1;
                actions.push(Action::PressButton {
                    port,
                    id: f.id.clone(),
                    press: Press::Recheck,
                });
            }
        }
        for f in self.functions.values_mut() {
            let (slot, id) = (f.slot, f.id.clone());
            let acpi = self.topology.acpi_select(slot);
            let Some(r) = f.request_mut() else {
                continue;
            };
            if r.stall_reported || now.saturating_sub(r.since) < self.options.stall_after {
                continue;
            }
            let diagnosis = match (acpi, slot) {
                (Some((select, _)), _) => {
                    let serviced = regs.acpi_bus(select).map_or(0, |b| b.serviced);
                    diagnosis::acpi(slot.bus(), serviced > r.serviced_at_request)
                }
                (None, SlotId::Port(port)) => match regs.port_slot(port) {
                    Some(view) => diagnosis::native(slot.bus(), &view),
                    None => continue,
                },
                (None, SlotId::RootBus(_)) => continue,
            };
            r.stall_reported = true;
            actions.push(Action::Emit(Event::UnplugStalled {
                id,
                bus: slot.bus(),
                seconds: now.saturating_sub(r.since).as_secs(),
                diagnosis,
            }));
        }
        actions
    }

    // ---- Commands ----

    fn blockdev_add(
        &mut self,
        node: String,
        path: PathBuf,
        readonly: bool,
        format: ImageFormat,
    ) -> Result<Vec<Action>, HotplugError> {
        if !valid_node_name(&node) {
            return Err(HotplugError::InvalidNodeName(node));
        }
        if self.nodes.contains_key(&node) {
            return Err(HotplugError::DuplicateNode(node));
        }
        self.nodes.insert(
            node.clone(),
            Node {
                path: path.clone(),
                readonly,
                format,
            },
        );
        Ok(vec![Action::OpenBackend {
            node,
            path,
            readonly,
            format,
        }])
    }

    fn blockdev_del(&mut self, node: &str) -> Result<Vec<Action>, HotplugError> {
        if !self.nodes.contains_key(node) {
            return Err(HotplugError::NoSuchNode(node.to_string()));
        }
        if let Some(user) = self.node_user(node) {
            return Err(HotplugError::NodeBusy {
                node: node.to_string(),
                user: user.id.clone(),
            });
        }
        self.nodes.remove(node);
        Ok(vec![Action::CloseBackend {
            node: node.to_string(),
        }])
    }

    fn device_add(
        &mut self,
        now: Duration,
        add: DeviceAdd,
        regs: &dyn SlotRegisters,
    ) -> Result<Vec<Action>, HotplugError> {
        let id = add.id;
        if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control() || c == '/') {
            return Err(HotplugError::InvalidId(id));
        }
        if self.device(&id).is_some() {
            return Err(HotplugError::DuplicateId(id));
        }
        let node = self
            .nodes
            .get(&add.drive)
            .ok_or_else(|| HotplugError::NoSuchDrive(add.drive.clone()))?
            .clone();
        if let Some(user) = self.node_user(&add.drive) {
            return Err(HotplugError::DriveInUse {
                drive: add.drive,
                user: user.id.clone(),
            });
        }
        let slot = match add.bus {
            Some(BusId::RootBus) => {
                SlotId::RootBus(self.root_bus_slot(now, add.addr.as_ref(), regs)?)
            }
            Some(BusId::Port(n)) => {
                if self.topology.port_mode(n).is_none() {
                    return Err(HotplugError::NoSuchBus(BusId::Port(n)));
                }
                check_port_addr(BusId::Port(n), add.addr.as_ref())?;
                SlotId::Port(n)
            }
            None => {
                let n = (0..self.topology.port_count())
                    .find(|&n| {
                        self.occupant(SlotId::Port(n)).is_none()
                            && regs.port_slot(n).is_some_and(|v| !v.present)
                    })
                    .ok_or(HotplugError::NoFreePort)?;
                check_port_addr(BusId::Port(n), add.addr.as_ref())?;
                SlotId::Port(n)
            }
        };
        self.check_slot_free(now, slot, regs)?;
        let remove = add
            .remove_on_backend_error
            .unwrap_or(self.options.remove_on_backend_error);
        let key = self.add_function(
            &id,
            slot,
            Backing {
                node: Some(add.drive.clone()),
                path: node.path,
                readonly: node.readonly,
            },
            remove,
        );
        let mut actions = vec![Action::Plug {
            key,
            id,
            slot,
            node: add.drive,
        }];
        // A card pulled out of this slot whose driver has not reset it yet: its time is up.
        let stale: Vec<FunctionKey> = self
            .pulled()
            .filter(|f| f.slot == slot)
            .map(|f| f.key)
            .collect();
        for key in stale {
            let f = self.functions.remove(&key).expect("just found");
            actions.push(Action::ReleasePulled {
                key,
                id: f.id,
                slot,
                by: PulledRelease::Vmm,
            });
        }
        Ok(actions)
    }

    /// The root bus slot for a `device_add`: `addr`'s, or the first free one.
    fn root_bus_slot(
        &self,
        now: Duration,
        addr: Option<&DeviceAddr>,
        regs: &dyn SlotRegisters,
    ) -> Result<u8, HotplugError> {
        if !self.topology.root_bus_hotplug() {
            return Err(HotplugError::RootBusNotHotpluggable);
        }
        match addr {
            Some(a) if a.function != 0 => Err(HotplugError::FunctionNotZero(a.text.clone())),
            Some(a) if !self.topology.is_root_bus_slot(a.device) => {
                Err(HotplugError::NotAHotplugSlot {
                    addr: a.text.clone(),
                    device: a.device,
                })
            }
            Some(a) => Ok(a.device),
            None => {
                let busy = regs
                    .acpi_bus(super::topology::ROOT_BUS_SELECT)
                    .map_or(u32::MAX, |b| b.occupied | b.vanished);
                (FIRST_ROOT_BUS_SLOT..super::topology::FIRST_ROOT_PORT_SLOT)
                    .find(|&d| {
                        let slot = SlotId::RootBus(d);
                        busy & 1 << d == 0
                            && self.occupant(slot).is_none()
                            && !self.pull_unsettled(now, slot)
                    })
                    .ok_or(HotplugError::NoFreeRootBusSlot)
            }
        }
    }

    /// A card was pulled out of `slot` less than [`ACPI_PULL_SETTLE`] ago and the guest's
    /// driver has not let go of it yet.
    fn pull_unsettled(&self, now: Duration, slot: SlotId) -> bool {
        self.pulled().any(|f| {
            f.slot == slot
                && matches!(f.lifecycle, Lifecycle::Pulled { since, .. }
                    if now.saturating_sub(since) < ACPI_PULL_SETTLE)
        })
    }

    /// Refuses a slot that is not free for a new card: taken, holding a card on its way out,
    /// or an ACPI slot whose pulled device the guest has not noticed yet.
    fn check_slot_free(
        &self,
        now: Duration,
        slot: SlotId,
        regs: &dyn SlotRegisters,
    ) -> Result<(), HotplugError> {
        let acpi = self
            .topology
            .acpi_select(slot)
            .and_then(|(select, device)| Some((regs.acpi_bus(select)?, device)));
        if let Some((bus, device)) = acpi {
            if bus.vanished & 1 << device != 0 {
                return Err(HotplugError::BusCheckPending {
                    bus: slot.bus(),
                    device,
                });
            }
        }
        if let Some(f) = self.occupant(slot) {
            return Err(HotplugError::SlotOccupied {
                slot: slot_name(slot),
                occupant: f.id.clone(),
            });
        }
        // An ACPI slot whose last card was pulled out, and whose driver in the guest has not let
        // go of it (reset it) yet, for ACPI_PULL_SETTLE after the pull. acpiphp handles its
        // events one after the other, each to its end, a driver's probe included: while it is
        // still busy with the pulled card, a card inserted now is seen, if at all, through the
        // stale device it has not removed yet, and never added. The control-plane soak lost one
        // that way (a card pulled during its probe, the next inserted 0.45 s later). A card the
        // guest never bound has no driver to reset it: after the settle time, the slot is free.
        if acpi.is_some() && self.pull_unsettled(now, slot) {
            return Err(HotplugError::PulledNotReleased(slot_name(slot)));
        }
        // An empty native slot whose power indicator blinks: the guest is powering it on or
        // off, after a card that is gone. Linux's pciehp, having powered a slot off, waits a
        // second and then discards the presence and link changes that came meanwhile as its
        // own doing (remove_board); a card inserted then is never seen. The control-plane soak
        // lost one that way, after a device_del the guest answered and an x-surprise-remove of
        // the powered-off card.
        if let SlotId::Port(n) = slot {
            let native = self.topology.port_mode(n) == Some(PortMode::Native);
            if native
                && regs
                    .port_slot(n)
                    .is_some_and(|v| v.power_indicator == Indicator::Blinking)
            {
                return Err(HotplugError::SlotInTransition(slot.bus()));
            }
        }
        let busy = match slot {
            SlotId::Port(n) => regs.port_slot(n).is_some_and(|v| v.present),
            SlotId::RootBus(_) => acpi.is_some_and(|(bus, d)| bus.occupied & 1 << d != 0),
        };
        if busy {
            return Err(HotplugError::SlotOccupied {
                slot: slot_name(slot),
                occupant: match slot {
                    SlotId::Port(_) => "a card being removed",
                    SlotId::RootBus(_) => "a device being removed",
                }
                .to_string(),
            });
        }
        Ok(())
    }

    fn device_del(
        &mut self,
        now: Duration,
        id: &str,
        regs: &dyn SlotRegisters,
    ) -> Result<Vec<Action>, HotplugError> {
        let (key, slot) = self.removable(id)?;
        let f = &self.functions[&key];
        let acpi = self.topology.acpi_select(slot);
        if let (None, SlotId::Port(port)) = (acpi, slot) {
            // pciehp blinks while it works on the slot (the grace period after a press, or
            // bringing it up); a press now would cancel or be ignored.
            if regs
                .port_slot(port)
                .is_some_and(|v| v.power_indicator == Indicator::Blinking)
            {
                return Err(HotplugError::GuestBusy {
                    id: id.to_string(),
                    port: slot.bus(),
                });
            }
        }
        if let Some(r) = f.request() {
            let ago = now.saturating_sub(r.last_request);
            if ago < self.options.repress_after {
                return Err(HotplugError::AlreadyRequested {
                    id: id.to_string(),
                    ms: ago.as_millis(),
                });
            }
        }
        let repeat = f.request().is_some();
        let action = match (acpi, slot) {
            (Some((select, device)), _) => Action::RequestEject {
                select,
                device,
                bus: slot.bus(),
                id: id.to_string(),
            },
            (None, SlotId::Port(port)) => Action::PressButton {
                port,
                id: id.to_string(),
                press: if repeat {
                    Press::Repeat
                } else {
                    Press::Request
                },
            },
            (None, SlotId::RootBus(_)) => unreachable!("refused above"),
        };
        let serviced = acpi
            .and_then(|(select, _)| regs.acpi_bus(select))
            .map_or(0, |b| b.serviced);
        let f = self.functions.get_mut(&key).expect("found above");
        match &mut f.lifecycle {
            Lifecycle::Present => {
                f.lifecycle = Lifecycle::UnplugRequested(UnplugRequest {
                    since: now,
                    last_request: now,
                    requests: 1,
                    stall_reported: false,
                    recheck_at: None,
                    serviced_at_request: serviced,
                });
            }
            // The guest has already powered the slot off and the card goes within
            // `release_after`: pressing the button again would make pciehp power it back on.
            Lifecycle::PoweredOff { .. } => return Ok(Vec::new()),
            _ => {
                let r = f.request_mut().expect("requested");
                r.last_request = now;
                r.requests += 1;
            }
        }
        Ok(vec![action])
    }

    fn surprise_remove(
        &mut self,
        now: Duration,
        id: &str,
        in_flight: Option<InFlightPolicy>,
        bar_reads: Option<BarReads>,
        regs: &dyn SlotRegisters,
    ) -> Result<Vec<Action>, HotplugError> {
        let (key, _) = self.removable(id)?;
        let policy = SurprisePolicy {
            in_flight: in_flight.unwrap_or(self.options.surprise.in_flight),
            bar_reads: bar_reads.unwrap_or(self.options.surprise.bar_reads),
        };
        Ok(self.pull(now, key, policy, regs))
    }

    /// Pulls attached function `key` out: its lifecycle becomes `Pulled`, and
    /// `DEVICE_DELETED` follows the pull at once.
    fn pull(
        &mut self,
        now: Duration,
        key: FunctionKey,
        policy: SurprisePolicy,
        regs: &dyn SlotRegisters,
    ) -> Vec<Action> {
        let f = self.functions.get_mut(&key).expect("callers found it");
        if let SlotId::Port(n) = f.slot {
            let native = self.topology.port_mode(n) == Some(PortMode::Native);
            if native && regs.port_slot(n).is_some_and(|v| v.powered) {
                self.surprised_ports.insert(n);
            }
        }
        f.lifecycle = Lifecycle::Pulled { policy, since: now };
        vec![
            Action::Pull {
                key,
                id: f.id.clone(),
                slot: f.slot,
                policy,
            },
            Action::Emit(Event::DeviceDeleted { id: f.id.clone() }),
        ]
    }

    // ---- Guest and host events ----

    fn on_slot_control(&mut self, now: Duration, port: u8, event: SlotEvent) -> Vec<Action> {
        if self.topology.port_mode(port).is_none() {
            return Vec::new();
        }
        let slot = SlotId::Port(port);
        let occupant = self.occupant(slot).map(|f| (f.key, f.id.clone()));
        let mut actions = vec![Action::Emit(Event::Slot {
            bus: slot.bus(),
            slot: slot.number(),
            change: SlotChange::Guest(event),
            device: occupant.as_ref().map(|(_, id)| id.clone()),
        })];
        let Some((key, _)) = occupant else {
            if event == SlotEvent::PowerOff {
                self.surprised_ports.remove(&port);
            }
            return actions;
        };
        let f = self.functions.get_mut(&key).expect("occupant");
        match event {
            // The guest's answer to a surprise removal, not to the card inserted since.
            SlotEvent::PowerOff if self.surprised_ports.remove(&port) => {}
            SlotEvent::PowerOff if !matches!(f.lifecycle, Lifecycle::PoweredOff { .. }) => {
                let request = f.request().copied();
                f.lifecycle = Lifecycle::PoweredOff {
                    since: now,
                    request,
                };
            }
            SlotEvent::PowerOn => {
                if let Lifecycle::PoweredOff { request, .. } = f.lifecycle {
                    f.lifecycle = request.map_or(Lifecycle::Present, Lifecycle::UnplugRequested);
                }
            }
            SlotEvent::PowerIndicator(Indicator::Off)
                if matches!(f.lifecycle, Lifecycle::PoweredOff { .. }) =>
            {
                self.release_powered_off(key, &mut actions);
            }
            SlotEvent::PowerIndicator(Indicator::On) => {
                // The guest finished bringing the slot up. A press that came while it was doing
                // so is ignored by pciehp ("invalid state"): look again shortly, and press again
                // if the guest is not blinking by then.
                if let Lifecycle::UnplugRequested(r) = &mut f.lifecycle {
                    r.recheck_at = Some(now + self.options.recheck_after);
                }
            }
            _ => {}
        }
        actions
    }

    /// The guest has let go of the card in powered-off function `key`'s slot: it goes now, its
    /// backend with it.
    ///
    /// Linux's pciehp powers the slot off, waits a second, discards the link and presence
    /// changes that came meanwhile, then turns the power indicator off. Releasing the card at
    /// the indicator-off command (as QEMU does) means a card inserted right after
    /// `DEVICE_DELETED` is never mistaken by the guest for an effect of its own power-off.
    fn release_powered_off(&mut self, key: FunctionKey, actions: &mut Vec<Action>) {
        let f = self.functions.remove(&key).expect("callers found it");
        let requested = f.request().is_some();
        actions.push(Action::Release {
            key,
            id: f.id.clone(),
            slot: f.slot,
            cause: ReleaseCause::PoweredOff { requested },
        });
        actions.push(Action::Emit(Event::DeviceDeleted { id: f.id }));
    }

    fn on_eject(&mut self, select: u8, device: u8) -> Vec<Action> {
        let Some(slot) = self.topology.acpi_slot(select, device) else {
            return Vec::new();
        };
        let occupant = self.occupant(slot).map(|f| f.key);
        let mut actions = vec![Action::Emit(Event::Slot {
            bus: slot.bus(),
            slot: slot.number(),
            change: SlotChange::Ejected,
            device: occupant.map(|k| self.functions[&k].id.clone()),
        })];
        if let Some(key) = occupant {
            let f = self.functions.remove(&key).expect("occupant");
            actions.push(Action::Release {
                key,
                id: f.id.clone(),
                slot,
                cause: ReleaseCause::Ejected {
                    requested: f.request().is_some(),
                },
            });
            actions.push(Action::Emit(Event::DeviceDeleted { id: f.id }));
        }
        actions
    }

    fn on_backend_failed(
        &mut self,
        now: Duration,
        id: &str,
        operation: String,
        error: String,
        regs: &dyn SlotRegisters,
    ) -> Vec<Action> {
        let Some(f) = self.device(id) else {
            return Vec::new();
        };
        if f.backend_error_reported {
            return Vec::new();
        }
        let (key, remove) = (f.key, f.remove_on_backend_error);
        self.functions
            .get_mut(&key)
            .expect("found")
            .backend_error_reported = true;
        let mut actions = vec![Action::Emit(Event::BackendError {
            id: id.to_string(),
            operation,
            error,
            remove,
        })];
        if remove {
            match self.removable(id) {
                Ok(_) => {
                    let policy = SurprisePolicy {
                        in_flight: InFlightPolicy::Fail,
                        bar_reads: self.options.surprise.bar_reads,
                    };
                    actions.extend(self.pull(now, key, policy, regs));
                }
                Err(e) => actions.push(Action::Warn(format!(
                    "{id}: backend failed, cannot pull it out: {e}"
                ))),
            }
        }
        actions
    }

    /// The attached function `id` and its slot, if it can be taken away: its slot is a root
    /// port's or an ACPI hot-plug slot (not a root bus place of a machine without ACPI
    /// hot-plug).
    fn removable(&self, id: &str) -> Result<(FunctionKey, SlotId), HotplugError> {
        let f = self
            .device(id)
            .ok_or_else(|| HotplugError::DeviceNotFound(id.to_string()))?;
        if matches!(f.slot, SlotId::RootBus(_)) && self.topology.acpi_select(f.slot).is_none() {
            return Err(HotplugError::CannotRemove(f.id.clone()));
        }
        Ok((f.key, f.slot))
    }

    fn add_function(
        &mut self,
        id: &str,
        slot: SlotId,
        backing: Backing,
        remove_on_backend_error: bool,
    ) -> FunctionKey {
        let key = FunctionKey(self.next_key);
        self.next_key += 1;
        self.functions.insert(
            key,
            Function {
                key,
                id: id.to_string(),
                slot,
                backing,
                remove_on_backend_error,
                backend_error_reported: false,
                lifecycle: Lifecycle::Present,
            },
        );
        key
    }
}

/// A slot as refusals name it: "rp1", "pcie.0 slot 5".
fn slot_name(slot: SlotId) -> String {
    match slot {
        SlotId::Port(n) => BusId::Port(n).to_string(),
        SlotId::RootBus(d) => format!("{} slot {d}", BusId::RootBus),
    }
}

/// `addr` on a root port: only device 0 (function 0) exists below it.
fn check_port_addr(port: BusId, addr: Option<&DeviceAddr>) -> Result<(), HotplugError> {
    match addr {
        Some(a) if (a.device, a.function) != (0, 0) => Err(HotplugError::PortAddr {
            addr: a.text.clone(),
            port,
        }),
        _ => Ok(()),
    }
}

/// A letter, then letters, digits, '-', '_', '.' (QEMU's rule for node names).
fn valid_node_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}
