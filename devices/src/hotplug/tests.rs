//! One test per rule of the control plane (SPEC.md §5/§6, docs/hotplug.md), each
//! against registers a test sets by hand.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::acpi_hotplug::AcpiBusState;
use crate::pci::{Indicator, SlotEvent, SlotNotifications};
use crate::virtio::block::ImageFormat;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Registers as pciehp leaves them on a bound, idle, empty slot; ACPI buses as built.
#[derive(Clone)]
struct Regs {
    ports: Vec<PortSlotView>,
    acpi: Vec<AcpiBusState>,
}

impl Regs {
    fn new(topology: &Topology) -> Self {
        let armed = PortSlotView {
            present: false,
            powered: false,
            power_indicator: Indicator::Off,
            notifications: SlotNotifications {
                hot_plug_interrupt: true,
                attention_button: true,
                link_state: true,
                command_completed: true,
                ..Default::default()
            },
            attention_pressed: false,
            msi_enabled: true,
        };
        Regs {
            ports: vec![armed; usize::from(topology.port_count())],
            acpi: topology
                .acpi_hotpluggable_masks()
                .into_iter()
                .map(|hotpluggable| AcpiBusState {
                    hotpluggable,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// A card in port `n`'s slot, powered and enabled by the guest.
    fn enabled(&mut self, n: u8) -> &mut PortSlotView {
        let p = &mut self.ports[usize::from(n)];
        p.present = true;
        p.powered = true;
        p.power_indicator = Indicator::On;
        p
    }
}

impl SlotRegisters for Regs {
    fn port_slot(&self, port: u8) -> Option<PortSlotView> {
        self.ports.get(usize::from(port)).copied()
    }
    fn acpi_bus(&self, select: u8) -> Option<AcpiBusState> {
        self.acpi.get(usize::from(select)).copied()
    }
}

/// rp0, rp1 native; rp2 ACPI (bus select 1); root bus slots 1..15 (bus select 0).
fn machine() -> (HotplugControl, Regs) {
    let t = Topology::new(&[PortMode::Native, PortMode::Native, PortMode::Acpi], true);
    let regs = Regs::new(&t);
    (HotplugControl::new(t, Options::default()), regs)
}

fn node(c: &mut HotplugControl, regs: &Regs, name: &str) {
    let cmd = Command::BlockdevAdd {
        node: name.into(),
        path: PathBuf::from(format!("/img/{name}")),
        readonly: false,
        format: ImageFormat::Raw,
    };
    c.command(ms(0), cmd, regs).unwrap();
}

fn add(id: &str, drive: &str, bus: Option<&str>, addr: Option<&str>) -> Command {
    Command::DeviceAdd(DeviceAdd {
        id: id.into(),
        drive: drive.into(),
        bus: bus.map(|b| b.parse().unwrap()),
        addr: addr.map(|a| a.parse().unwrap()),
        remove_on_backend_error: None,
    })
}

fn del(id: &str) -> Command {
    Command::DeviceDel { id: id.into() }
}

fn pull(id: &str, in_flight: Option<InFlightPolicy>) -> Command {
    Command::SurpriseRemove {
        id: id.into(),
        in_flight,
        bar_reads: None,
    }
}

/// A device `id` on node `id`, hot-added to `bus` and enabled by the guest.
fn plugged(c: &mut HotplugControl, regs: &mut Regs, id: &str, bus: &str) -> FunctionKey {
    node(c, regs, id);
    let actions = c
        .command(ms(0), add(id, id, Some(bus), None), regs)
        .unwrap();
    let Action::Plug { key, slot, .. } = actions[0] else {
        panic!("{actions:?}")
    };
    match slot {
        SlotId::Port(n) => {
            regs.enabled(n);
        }
        SlotId::RootBus(_) => {}
    }
    if let Some((select, d)) = c.topology().acpi_select(slot) {
        regs.acpi[usize::from(select)].occupied |= 1 << d;
    }
    key
}

fn deleted(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::DeviceDeleted { id }) => Some(id.as_str()),
            _ => None,
        })
        .collect()
}

fn stalls(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::UnplugStalled { diagnosis, .. }) => Some(diagnosis.as_str()),
            _ => None,
        })
        .collect()
}

fn slot_event(port: u8, event: SlotEvent) -> GuestEvent {
    GuestEvent::SlotControl { port, event }
}

/// Runs `command` expecting a refusal, and checks that it changed nothing.
fn refused(c: &mut HotplugControl, now: Duration, command: Command, regs: &Regs) -> HotplugError {
    let before = c.clone();
    let e = c.command(now, command, regs).unwrap_err();
    assert_eq!(*c, before, "a refused command changed the state: {e}");
    e
}

#[test]
fn nodes_open_once_and_close_only_when_unused() {
    let (mut c, mut regs) = machine();
    let open = Command::BlockdevAdd {
        node: "n1".into(),
        path: "/img/a".into(),
        readonly: true,
        format: ImageFormat::Qcow2,
    };
    assert_eq!(
        c.command(ms(0), open.clone(), &regs).unwrap(),
        vec![Action::OpenBackend {
            node: "n1".into(),
            path: "/img/a".into(),
            readonly: true,
            format: ImageFormat::Qcow2,
        }]
    );
    assert_eq!(
        refused(&mut c, ms(0), open, &regs),
        HotplugError::DuplicateNode("n1".into())
    );
    for bad in ["", "1abc", "a b", "a/b", "é"] {
        let cmd = Command::BlockdevAdd {
            node: bad.into(),
            path: "/x".into(),
            readonly: false,
            format: ImageFormat::Raw,
        };
        assert!(matches!(
            refused(&mut c, ms(0), cmd, &regs),
            HotplugError::InvalidNodeName(_)
        ));
    }
    let close = |n: &str| Command::BlockdevDel { node: n.into() };
    assert_eq!(
        refused(&mut c, ms(0), close("nope"), &regs),
        HotplugError::NoSuchNode("nope".into())
    );
    // The backend outlives its device: busy until the device is gone.
    plugged(&mut c, &mut regs, "d1", "rp0");
    let e = refused(&mut c, ms(0), close("d1"), &regs);
    assert_eq!(
        e.to_string(),
        "Node 'd1' is busy: device 'd1' uses it (device_del it first, and wait for DEVICE_DELETED)"
    );
    c.command(ms(0), pull("d1", None), &regs).unwrap();
    assert_eq!(
        c.command(ms(0), close("d1"), &regs).unwrap(),
        vec![Action::CloseBackend { node: "d1".into() }]
    );
    assert!(c.nodes().contains_key("n1") && !c.nodes().contains_key("d1"));
}

#[test]
fn device_add_refusals_change_nothing_and_say_why() {
    let (mut c, mut regs) = machine();
    node(&mut c, &regs, "n");
    plugged(&mut c, &mut regs, "d0", "rp0");
    let cases: Vec<(Command, &str)> = vec![
        (add("", "n", None, None), "Invalid device id ''"),
        (add("a/b", "n", None, None), "Invalid device id 'a/b'"),
        (add("d0", "n", None, None), "Duplicate device ID 'd0'"),
        (
            add("x", "zz", None, None),
            "Drive 'zz' not found (add it with blockdev-add first)",
        ),
        (
            add("x", "d0", None, None),
            "Drive 'd0' is already in use by device 'd0'",
        ),
        (add("x", "n", Some("rp7"), None), "Bus 'rp7' not found"),
        (
            add("x", "n", Some("rp1"), Some("1")),
            "addr '1': the slot of root port rp1 holds device 0 function 0 only",
        ),
        (
            add("x", "n", Some("rp0"), None),
            "Slot of rp0 is occupied by 'd0'",
        ),
        (
            add("x", "n", Some("pcie.0"), Some("10")),
            "addr '10': device 0x10 of pcie.0 is not a hot-plug slot (slots are 0x1..0xf)",
        ),
        (
            add("x", "n", Some("pcie.0"), Some("5.1")),
            "addr '5.1': this VMM hot-plugs function 0 only",
        ),
    ];
    for (cmd, message) in cases {
        assert_eq!(refused(&mut c, ms(0), cmd, &regs).to_string(), message);
    }
    // A card still present in a slot nobody occupies any more: on its way out.
    regs.ports[1].present = true;
    assert_eq!(
        refused(&mut c, ms(0), add("x", "n", Some("rp1"), None), &regs).to_string(),
        "Slot of rp1 is occupied by 'a card being removed'"
    );
    // No bus given: the first free port; none free.
    regs.ports[1].present = false;
    plugged(&mut c, &mut regs, "d1", "rp1");
    plugged(&mut c, &mut regs, "d2", "rp2");
    assert_eq!(
        refused(&mut c, ms(0), add("x", "n", None, None), &regs),
        HotplugError::NoFreePort
    );
    let no_acpi = Topology::new(&[PortMode::Native], false);
    let regs2 = Regs::new(&no_acpi);
    let mut c2 = HotplugControl::new(no_acpi, Options::default());
    node(&mut c2, &regs2, "n");
    assert_eq!(
        refused(&mut c2, ms(0), add("x", "n", Some("pcie.0"), None), &regs2),
        HotplugError::RootBusNotHotpluggable
    );
}

#[test]
fn device_add_picks_the_first_free_slot() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "a", "rp0");
    node(&mut c, &regs, "b");
    let actions = c.command(ms(0), add("b", "b", None, None), &regs).unwrap();
    assert!(matches!(
        actions[0],
        Action::Plug {
            slot: SlotId::Port(1),
            ..
        }
    ));
    // Root bus: slot 1 holds a device, slot 2 a vanished one the guest has not noticed.
    plugged(&mut c, &mut regs, "r1", "pcie.0");
    assert_eq!(c.device("r1").unwrap().slot, SlotId::RootBus(1));
    regs.acpi[0].vanished |= 1 << 2;
    node(&mut c, &regs, "r2");
    let actions = c
        .command(ms(0), add("r2", "r2", Some("pcie.0"), None), &regs)
        .unwrap();
    assert!(matches!(
        actions[0],
        Action::Plug {
            slot: SlotId::RootBus(3),
            ..
        }
    ));
}

#[test]
fn native_removal_waits_for_power_off_and_indicator_off() {
    let (mut c, mut regs) = machine();
    let key = plugged(&mut c, &mut regs, "d", "rp1");
    assert_eq!(
        c.command(ms(100), del("d"), &regs).unwrap(),
        vec![Action::PressButton {
            port: 1,
            id: "d".into(),
            press: Press::Request
        }]
    );
    // pciehp: blink for 5 s, power off, wait a second, indicator off.
    let a = c.guest_event(
        ms(200),
        slot_event(1, SlotEvent::PowerIndicator(Indicator::Blinking)),
    );
    assert!(deleted(&a).is_empty());
    let a = c.guest_event(ms(5200), slot_event(1, SlotEvent::PowerOff));
    assert!(deleted(&a).is_empty(), "released at power-off: {a:?}");
    assert!(matches!(
        c.device("d").unwrap().lifecycle,
        Lifecycle::PoweredOff {
            request: Some(_),
            ..
        }
    ));
    assert!(deleted(&c.tick(ms(6000), &regs)).is_empty());
    let a = c.guest_event(
        ms(6200),
        slot_event(1, SlotEvent::PowerIndicator(Indicator::Off)),
    );
    assert_eq!(
        a[1..],
        [
            Action::Release {
                key,
                id: "d".into(),
                slot: SlotId::Port(1),
                cause: ReleaseCause::PoweredOff { requested: true }
            },
            Action::Emit(Event::DeviceDeleted { id: "d".into() }),
        ]
    );
    assert!(c.device("d").is_none() && c.functions().next().is_none());
    // Once: nothing more of it, whatever the guest does next.
    let a = c.guest_event(
        ms(6300),
        slot_event(1, SlotEvent::PowerIndicator(Indicator::Off)),
    );
    assert!(deleted(&a).is_empty());
    assert!(deleted(&c.tick(ms(60_000), &regs)).is_empty());
}

#[test]
fn a_power_off_without_indicator_off_releases_after_release_after() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    // Guest-initiated (echo 0 > /sys/bus/pci/slots/0/power): no device_del.
    c.guest_event(ms(1000), slot_event(0, SlotEvent::PowerOff));
    assert!(deleted(&c.tick(ms(3999), &regs)).is_empty());
    let a = c.tick(ms(4000), &regs);
    assert_eq!(deleted(&a), ["d"]);
    assert!(a.contains(&Action::Release {
        key: FunctionKey(0),
        id: "d".into(),
        slot: SlotId::Port(0),
        cause: ReleaseCause::PoweredOff { requested: false }
    }));
}

#[test]
fn powering_the_slot_on_again_keeps_the_device_and_its_request() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    c.command(ms(0), del("d"), &regs).unwrap();
    c.guest_event(ms(1000), slot_event(0, SlotEvent::PowerOff));
    c.guest_event(ms(1500), slot_event(0, SlotEvent::PowerOn));
    assert!(matches!(
        c.device("d").unwrap().lifecycle,
        Lifecycle::UnplugRequested(_)
    ));
    assert!(deleted(&c.tick(ms(10_000), &regs)).is_empty());
}

#[test]
fn device_del_is_refused_while_the_power_indicator_blinks() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    regs.ports[0].power_indicator = Indicator::Blinking;
    let e = refused(&mut c, ms(0), del("d"), &regs);
    assert_eq!(
        e.to_string(),
        "Hot-unplug of 'd' refused: guest is busy (power indicator of rp0 blinking)"
    );
    regs.ports[0].power_indicator = Indicator::On;
    assert!(c.command(ms(0), del("d"), &regs).is_ok());
}

#[test]
fn a_second_request_inside_the_repeat_window_is_refused_and_after_it_repeated() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    c.command(ms(1000), del("d"), &regs).unwrap();
    let e = refused(&mut c, ms(2500), del("d"), &regs);
    assert_eq!(
        e.to_string(),
        "device_del of 'd' already requested 1500 ms ago; waiting for the guest"
    );
    assert_eq!(
        c.command(ms(3000), del("d"), &regs).unwrap(),
        vec![Action::PressButton {
            port: 0,
            id: "d".into(),
            press: Press::Repeat
        }]
    );
    let r = *c.device("d").unwrap().request().unwrap();
    assert_eq!(
        (r.since, r.last_request, r.requests),
        (ms(1000), ms(3000), 2)
    );
    // The window counts from the last request.
    assert!(c.command(ms(4999), del("d"), &regs).is_err());
    // ACPI slots keep the same window.
    plugged(&mut c, &mut regs, "a", "pcie.0");
    c.command(ms(0), del("a"), &regs).unwrap();
    assert!(matches!(
        refused(&mut c, ms(1999), del("a"), &regs),
        HotplugError::AlreadyRequested { ms: 1999, .. }
    ));
    assert!(matches!(
        c.command(ms(2000), del("a"), &regs).unwrap()[..],
        [Action::RequestEject {
            select: 0,
            device: 1,
            ..
        }]
    ));
}

#[test]
fn a_press_the_guest_ignored_while_enabling_is_repeated_once_it_is_enabled() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    // device_del while pciehp is still bringing the slot up (power on, indicator not blinking
    // yet): pciehp logs "Button press: invalid state" and drops the press.
    regs.ports[0].power_indicator = Indicator::Off;
    c.command(ms(0), del("d"), &regs).unwrap();
    regs.ports[0].power_indicator = Indicator::On;
    c.guest_event(
        ms(500),
        slot_event(0, SlotEvent::PowerIndicator(Indicator::On)),
    );
    assert!(c.tick(ms(1499), &regs).is_empty());
    assert_eq!(
        c.tick(ms(1500), &regs),
        vec![Action::PressButton {
            port: 0,
            id: "d".into(),
            press: Press::Recheck
        }]
    );
    assert_eq!(c.device("d").unwrap().request().unwrap().requests, 2);
    assert!(c.tick(ms(1600), &regs).is_empty(), "checked once");

    // The guest took the press (blinking), or has not acknowledged it yet: no second press.
    for (indicator, pressed) in [(Indicator::Blinking, false), (Indicator::On, true)] {
        let (mut c, mut regs) = machine();
        plugged(&mut c, &mut regs, "d", "rp0");
        c.command(ms(0), del("d"), &regs).unwrap();
        c.guest_event(
            ms(500),
            slot_event(0, SlotEvent::PowerIndicator(Indicator::On)),
        );
        regs.ports[0].power_indicator = indicator;
        regs.ports[0].attention_pressed = pressed;
        assert!(c.tick(ms(2000), &regs).is_empty(), "{indicator} {pressed}");
    }
}

#[test]
fn an_unanswered_removal_is_reported_once_with_the_cause_from_the_registers() {
    let base = machine().1.ports[0];
    let n = |f: fn(&mut SlotNotifications)| {
        let mut v = base;
        f(&mut v.notifications);
        v
    };
    let cases: Vec<(PortSlotView, &str)> = vec![
        (
            n(|n| n.hot_plug_interrupt = false),
            "guest pciehp never enabled hot-plug interrupts on rp0: driver not bound — check _OSC negotiation or kernel parameters such as pcie_aspm=off",
        ),
        (
            n(|n| n.attention_button = false),
            "guest enabled hot-plug interrupts on rp0 but not the attention button: its driver does not handle button presses",
        ),
        (
            PortSlotView { msi_enabled: false, ..base },
            "guest armed rp0 but never enabled its MSI: the button press interrupt cannot be delivered",
        ),
        (
            PortSlotView { attention_pressed: true, ..base },
            "guest has not acknowledged the attention button on rp0 (Attention Button Pressed still set): its interrupt handler did not run",
        ),
        (
            PortSlotView { power_indicator: Indicator::Blinking, ..base },
            "guest acknowledged the button on rp0 and blinks the power indicator, but has not powered the slot off: its driver is still letting go of the device",
        ),
        (
            PortSlotView { power_indicator: Indicator::On, ..base },
            "guest acknowledged the button on rp0 but kept the slot powered: the press was cancelled (a second press within 5 s) or the guest refused the removal",
        ),
    ];
    for (view, diagnosis) in cases {
        let (mut c, mut regs) = machine();
        plugged(&mut c, &mut regs, "d", "rp0");
        c.command(ms(1000), del("d"), &regs).unwrap();
        regs.ports[0] = PortSlotView {
            present: true,
            powered: true,
            ..view
        };
        assert!(stalls(&c.tick(ms(15_999), &regs)).is_empty(), "too early");
        let a = c.tick(ms(16_000), &regs);
        assert_eq!(stalls(&a), [diagnosis]);
        assert!(matches!(
            &a[0],
            Action::Emit(Event::UnplugStalled { id, bus: BusId::Port(0), seconds: 15, .. }) if id == "d"
        ));
        assert!(stalls(&c.tick(ms(60_000), &regs)).is_empty(), "once");
        assert!(c.device("d").is_some(), "the device stays");
    }
    // ACPI: did the guest's event method read the request?
    for (looked, diagnosis) in [
        (false, "guest never read the ACPI eject request for rp2: its Generic Event Device handler did not run (ACPI0013 not bound, or its interrupt not delivered)"),
        (true, "guest read the ACPI eject request for rp2 but never evaluated the slot's _EJ0: acpiphp did not take the request (slot not registered, or the driver refused to let go of the device)"),
    ] {
        let (mut c, mut regs) = machine();
        plugged(&mut c, &mut regs, "d", "rp2");
        regs.acpi[1].serviced = 7;
        c.command(ms(0), del("d"), &regs).unwrap();
        if looked {
            regs.acpi[1].serviced += 1;
        }
        assert_eq!(stalls(&c.tick(ms(15_000), &regs)), [diagnosis]);
    }
    // The timeout is the user's.
    let t = Topology::new(&[PortMode::Native], true);
    let mut regs = Regs::new(&t);
    let options = Options {
        stall_after: Duration::from_secs(2),
        ..Options::default()
    };
    let mut c = HotplugControl::new(t, options);
    plugged(&mut c, &mut regs, "d", "rp0");
    regs.ports[0].notifications.hot_plug_interrupt = false;
    c.command(ms(0), del("d"), &regs).unwrap();
    assert_eq!(stalls(&c.tick(ms(2000), &regs)).len(), 1);
}

#[test]
fn acpi_removal_waits_for_the_guests_eject() {
    let (mut c, mut regs) = machine();
    let key = plugged(&mut c, &mut regs, "d", "rp2");
    assert_eq!(
        c.command(ms(0), del("d"), &regs).unwrap(),
        vec![Action::RequestEject {
            select: 1,
            device: 0,
            bus: BusId::Port(2),
            id: "d".into()
        }]
    );
    assert!(deleted(&c.tick(ms(30_000), &regs)).is_empty());
    // An eject of another (empty) slot, or of a bus that does not exist: no release.
    let a = c.guest_event(
        ms(1),
        GuestEvent::Eject {
            select: 0,
            device: 4,
        },
    );
    assert_eq!(
        a,
        vec![Action::Emit(Event::Slot {
            bus: BusId::RootBus,
            slot: 36,
            change: SlotChange::Ejected,
            device: None
        })]
    );
    assert!(c
        .guest_event(
            ms(1),
            GuestEvent::Eject {
                select: 9,
                device: 0
            }
        )
        .is_empty());
    let a = c.guest_event(
        ms(2),
        GuestEvent::Eject {
            select: 1,
            device: 0,
        },
    );
    assert_eq!(
        a,
        vec![
            Action::Emit(Event::Slot {
                bus: BusId::Port(2),
                slot: 2,
                change: SlotChange::Ejected,
                device: Some("d".into())
            }),
            Action::Release {
                key,
                id: "d".into(),
                slot: SlotId::Port(2),
                cause: ReleaseCause::Ejected { requested: true }
            },
            Action::Emit(Event::DeviceDeleted { id: "d".into() }),
        ]
    );
    // A guest-initiated eject of a cold-plugged root bus disk.
    let k = c
        .cold_plug("cold", SlotId::RootBus(1), "/img/c".into(), true)
        .unwrap();
    let a = c.guest_event(
        ms(3),
        GuestEvent::Eject {
            select: 0,
            device: 1,
        },
    );
    assert!(a.contains(&Action::Release {
        key: k,
        id: "cold".into(),
        slot: SlotId::RootBus(1),
        cause: ReleaseCause::Ejected { requested: false }
    }));
    assert_eq!(deleted(&a), ["cold"]);
}

#[test]
fn a_surprise_removal_pulls_at_once_and_the_slot_takes_a_new_card() {
    let (mut c, mut regs) = machine();
    let key = plugged(&mut c, &mut regs, "d", "rp0");
    c.command(ms(0), del("d"), &regs).unwrap();
    let a = c
        .command(ms(10), pull("d", Some(InFlightPolicy::Drop)), &regs)
        .unwrap();
    assert_eq!(
        a,
        vec![
            Action::Pull {
                key,
                id: "d".into(),
                slot: SlotId::Port(0),
                policy: SurprisePolicy {
                    in_flight: InFlightPolicy::Drop,
                    // The default: what Linux's virtio-pci survives.
                    bar_reads: BarReads::Zero
                }
            },
            Action::Emit(Event::DeviceDeleted { id: "d".into() }),
        ]
    );
    assert!(c.device("d").is_none() && c.pulled().count() == 1);
    assert_eq!(
        refused(&mut c, ms(20), pull("d", None), &regs),
        HotplugError::DeviceNotFound("d".into()),
        "removing twice"
    );
    assert!(refused(&mut c, ms(20), del("d"), &regs).is_device_not_found());
    // The slot now reads empty; the same id and node go into it again.
    regs.ports[0].present = false;
    let a = c
        .command(ms(30), add("d", "d", Some("rp0"), None), &regs)
        .unwrap();
    assert!(matches!(
        a[0],
        Action::Plug {
            slot: SlotId::Port(0),
            ..
        }
    ));
    assert_eq!(
        a[1],
        Action::ReleasePulled {
            key,
            id: "d".into(),
            slot: SlotId::Port(0),
            by: PulledRelease::Vmm
        }
    );
    regs.enabled(0);
    // pciehp's power-off for the pull comes after the new card went in: not an answer about it.
    let a = c.guest_event(ms(40), slot_event(0, SlotEvent::PowerOff));
    assert!(
        matches!(c.device("d").unwrap().lifecycle, Lifecycle::Present),
        "{a:?}"
    );
    assert!(deleted(&c.tick(ms(10_000), &regs)).is_empty());
    // The next one is.
    c.guest_event(ms(50), slot_event(0, SlotEvent::PowerOff));
    assert_eq!(deleted(&c.tick(ms(10_000), &regs)), ["d"]);
}

#[test]
fn a_pulled_device_is_let_go_when_its_driver_resets_it() {
    let (mut c, mut regs) = machine();
    let key = plugged(&mut c, &mut regs, "d", "rp1");
    c.command(ms(0), pull("d", None), &regs).unwrap();
    assert!(matches!(
        c.function(key).unwrap().lifecycle,
        Lifecycle::Pulled {
            policy: SurprisePolicy {
                in_flight: InFlightPolicy::Fail,
                ..
            },
            ..
        }
    ));
    assert!(c
        .guest_event(
            ms(1),
            GuestEvent::DriverReset {
                key: FunctionKey(99)
            }
        )
        .is_empty());
    assert_eq!(
        c.guest_event(ms(1), GuestEvent::DriverReset { key }),
        vec![Action::ReleasePulled {
            key,
            id: "d".into(),
            slot: SlotId::Port(1),
            by: PulledRelease::DriverReset
        }]
    );
    assert!(c.functions().next().is_none());
    // Or when the VMM let it go itself.
    let key = plugged(&mut c, &mut regs, "e", "pcie.0");
    c.command(ms(0), pull("e", None), &regs).unwrap();
    assert!(c
        .host_event(ms(1), HostEvent::PulledGone { key }, &regs)
        .is_empty());
    assert!(c.functions().next().is_none());
}

#[test]
fn an_acpi_slot_takes_a_new_card_only_after_the_guest_read_the_bus_check() {
    let (mut c, mut regs) = machine();
    let key = plugged(&mut c, &mut regs, "d", "pcie.0");
    c.command(ms(0), pull("d", None), &regs).unwrap();
    regs.acpi[0].occupied &= !(1 << 1);
    regs.acpi[0].vanished |= 1 << 1;
    node(&mut c, &regs, "n");
    assert_eq!(
        refused(&mut c, ms(0), add("n", "n", Some("pcie.0"), Some("1")), &regs).to_string(),
        "Slot 0x1 of pcie.0: the guest has not yet taken notice of the surprise removal of its last device; retry shortly"
    );
    regs.acpi[0].vanished = 0;
    // Read, but the guest's driver still has the pulled card (the soak's lost disk: acpiphp,
    // still probing it, never added the next).
    assert_eq!(
        refused(&mut c, ms(500), add("n", "n", Some("pcie.0"), Some("1")), &regs).to_string(),
        "pcie.0 slot 1: the guest's driver has not yet let go of the card pulled out of it; retry shortly"
    );
    // Without an address, the first slot that is free now.
    node(&mut c, &regs, "m");
    let a = c
        .command(ms(550), add("m", "m", Some("pcie.0"), None), &regs)
        .unwrap();
    assert!(matches!(
        a[0],
        Action::Plug {
            slot: SlotId::RootBus(2),
            ..
        }
    ));
    c.host_event(ms(600), HostEvent::PulledGone { key }, &regs);
    assert!(c
        .command(ms(700), add("n", "n", Some("pcie.0"), Some("1")), &regs)
        .is_ok());
}

/// A pulled card the guest never bound has no driver to let go of it: the slot takes a new
/// one once ACPI_PULL_SETTLE has passed (the stale one released then, by the VMM).
#[test]
fn an_acpi_slot_takes_a_new_card_after_the_settle_time_without_the_drivers_reset() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp2");
    c.command(ms(0), pull("d", None), &regs).unwrap();
    regs.ports[2].present = false;
    node(&mut c, &regs, "n");
    assert!(matches!(
        refused(&mut c, ms(9_999), add("n", "n", Some("rp2"), None), &regs),
        HotplugError::PulledNotReleased(_)
    ));
    let a = c
        .command(ms(10_000), add("n", "n", Some("rp2"), None), &regs)
        .unwrap();
    assert!(a.iter().any(|a| matches!(
        a,
        Action::ReleasePulled {
            by: PulledRelease::Vmm,
            ..
        }
    )));
}

/// The control-plane soak's lost card (tests/soak.rs): the guest answered a device_del by
/// powering the slot off, the powered-off card was then pulled, and a new card went in while
/// the guest was still in the second after its power-off whose presence and link changes
/// pciehp discards. The guest never saw it; the VMM held it for good. Now the new card waits
/// until the guest has turned the power indicator off.
#[test]
fn a_native_slot_takes_a_new_card_only_once_the_guest_is_done_powering_it() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    c.command(ms(0), del("d"), &regs).unwrap();
    regs.ports[0].power_indicator = Indicator::Blinking;
    c.guest_event(ms(5000), slot_event(0, SlotEvent::PowerOff));
    regs.ports[0].powered = false;
    c.command(ms(5200), pull("d", None), &regs).unwrap();
    regs.ports[0].present = false;
    node(&mut c, &regs, "n");
    assert_eq!(
        refused(&mut c, ms(5500), add("n", "n", Some("rp0"), None), &regs).to_string(),
        "Slot of rp0: the guest is still powering it on or off (power indicator blinking) after the card that left; retry shortly"
    );
    regs.ports[0].power_indicator = Indicator::Off;
    c.guest_event(
        ms(6200),
        slot_event(0, SlotEvent::PowerIndicator(Indicator::Off)),
    );
    assert!(c
        .command(ms(6300), add("n", "n", Some("rp0"), None), &regs)
        .is_ok());
}

#[test]
fn the_surprise_policy_defaults_are_the_users() {
    let t = Topology::new(&[PortMode::Acpi], true);
    let mut regs = Regs::new(&t);
    let surprise = SurprisePolicy {
        in_flight: InFlightPolicy::Drop,
        bar_reads: BarReads::Zero,
    };
    let mut c = HotplugControl::new(
        t,
        Options {
            surprise,
            ..Options::default()
        },
    );
    plugged(&mut c, &mut regs, "d", "rp0");
    let a = c.command(ms(0), pull("d", None), &regs).unwrap();
    assert!(
        matches!(a[0], Action::Pull { policy, slot: SlotId::Port(0), .. } if policy == surprise)
    );
    plugged(&mut c, &mut regs, "e", "pcie.0");
    let cmd = Command::SurpriseRemove {
        id: "e".into(),
        in_flight: Some(InFlightPolicy::Fail),
        bar_reads: Some(BarReads::AllOnes),
    };
    let a = c.command(ms(0), cmd, &regs).unwrap();
    assert!(matches!(
        a[0],
        Action::Pull {
            policy: SurprisePolicy {
                in_flight: InFlightPolicy::Fail,
                bar_reads: BarReads::AllOnes
            },
            ..
        }
    ));
}

#[test]
fn a_restored_control_plane_takes_the_new_vmms_policies_and_keeps_what_was_decided() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "before", "rp0");
    plugged(&mut c, &mut regs, "after", "rp1");
    c.command(ms(0), pull("before", None), &regs).unwrap();
    // Saved and restored into a VMM started with other policies.
    let mut restored: HotplugControl =
        serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    let zero = SurprisePolicy {
        in_flight: InFlightPolicy::Drop,
        bar_reads: BarReads::Zero,
    };
    let options = Options {
        surprise: zero,
        stall_after: ms(1_000),
        ..Options::default()
    };
    restored.set_options(options);
    assert_eq!(restored.options(), &options);
    // The device pulled before is still the same pulled device; the next pull is the new way.
    assert_eq!(
        restored.pulled().collect::<Vec<_>>(),
        c.pulled().collect::<Vec<_>>()
    );
    let a = restored
        .command(ms(10), pull("after", None), &regs)
        .unwrap();
    assert!(
        matches!(a[0], Action::Pull { policy, .. } if policy == zero),
        "{a:?}"
    );
}

#[test]
fn a_failing_backend_is_reported_once_and_pulls_the_disk_if_asked() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "keep", "rp0");
    node(&mut c, &regs, "go");
    let mut cmd = add("go", "go", Some("rp1"), None);
    if let Command::DeviceAdd(a) = &mut cmd {
        a.remove_on_backend_error = Some(true);
    }
    let key = match c.command(ms(0), cmd, &regs).unwrap()[0] {
        Action::Plug { key, .. } => key,
        _ => unreachable!(),
    };
    regs.enabled(1);
    let failed = |id: &str| HostEvent::BackendFailed {
        id: id.into(),
        operation: "read".into(),
        error: "Transport endpoint is not connected".into(),
    };
    let a = c.host_event(ms(0), failed("keep"), &regs);
    assert_eq!(
        a,
        vec![Action::Emit(Event::BackendError {
            id: "keep".into(),
            operation: "read".into(),
            error: "Transport endpoint is not connected".into(),
            remove: false
        })]
    );
    assert!(
        c.host_event(ms(1), failed("keep"), &regs).is_empty(),
        "once per disk"
    );
    assert!(c.host_event(ms(1), failed("nobody"), &regs).is_empty());
    let a = c.host_event(ms(2), failed("go"), &regs);
    assert!(matches!(
        a[0],
        Action::Emit(Event::BackendError { remove: true, .. })
    ));
    assert!(matches!(
        a[1],
        Action::Pull { key: k, policy: SurprisePolicy { in_flight: InFlightPolicy::Fail, .. }, .. } if k == key
    ));
    assert_eq!(deleted(&a), ["go"]);
}

#[test]
fn device_del_after_the_guest_powered_off_presses_nothing() {
    let (mut c, mut regs) = machine();
    plugged(&mut c, &mut regs, "d", "rp0");
    c.guest_event(ms(0), slot_event(0, SlotEvent::PowerOff));
    regs.ports[0].powered = false;
    regs.ports[0].power_indicator = Indicator::Off;
    assert_eq!(c.command(ms(100), del("d"), &regs).unwrap(), vec![]);
}

#[test]
fn cold_plugged_disks_are_managed_like_hot_added_ones() {
    let (mut c, regs) = machine();
    c.cold_plug("c0", SlotId::Port(0), "/img/c0".into(), false)
        .unwrap();
    assert_eq!(
        c.cold_plug("c0", SlotId::Port(1), "/x".into(), false),
        Err(HotplugError::DuplicateId("c0".into()))
    );
    assert_eq!(
        c.cold_plug("c1", SlotId::Port(0), "/x".into(), false)
            .unwrap_err()
            .to_string(),
        "Slot of rp0 is occupied by 'c0'"
    );
    assert_eq!(
        c.cold_plug("c1", SlotId::Port(9), "/x".into(), false),
        Err(HotplugError::NoSuchBus(BusId::Port(9)))
    );
    assert!(matches!(
        c.command(ms(0), del("c0"), &regs).unwrap()[0],
        Action::PressButton { port: 0, .. }
    ));
    // Without ACPI hot-plug a root bus disk cannot be removed.
    let t = Topology::new(&[], false);
    let regs = Regs::new(&t);
    let mut c = HotplugControl::new(t, Options::default());
    c.cold_plug("r", SlotId::RootBus(1), "/x".into(), false)
        .unwrap();
    assert_eq!(
        refused(&mut c, ms(0), del("r"), &regs).to_string(),
        "Bus 'pcie.0' does not support hotplugging: 'r' cannot be removed"
    );
    assert!(matches!(
        refused(&mut c, ms(0), pull("r", None), &regs),
        HotplugError::CannotRemove(_)
    ));
}

#[test]
fn slot_control_writes_are_reported_with_the_occupant() {
    let (mut c, mut regs) = machine();
    let a = c.guest_event(ms(0), slot_event(1, SlotEvent::LinkActive(true)));
    assert_eq!(
        a,
        vec![Action::Emit(Event::Slot {
            bus: BusId::Port(1),
            slot: 1,
            change: SlotChange::Guest(SlotEvent::LinkActive(true)),
            device: None
        })]
    );
    plugged(&mut c, &mut regs, "d", "rp1");
    let a = c.guest_event(ms(0), slot_event(1, SlotEvent::PowerOn));
    assert!(matches!(&a[0], Action::Emit(Event::Slot { device: Some(d), .. }) if d == "d"));
    assert!(c
        .guest_event(ms(0), slot_event(7, SlotEvent::PowerOn))
        .is_empty());
}
