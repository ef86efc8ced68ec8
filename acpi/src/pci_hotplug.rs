//! AML for ACPI PCI hot-plug: one device per hot-pluggable slot, the methods that drive the
//! platform's hot-plug register block, and the Generic Event Device whose interrupt runs them.
//!
//! The register block (24 I/O ports at [`PciHotplugConfig::port`], all registers 32 bits, bit
//! `n` of the first five standing for device number `n` of the selected bus) is the one
//! `devices::acpi_hotplug` models:
//!
//! | offset | name | AML field | meaning |
//! | --- | --- | --- | --- |
//! | 0x0 | select | `PSEL` | which bus the other registers refer to (the index into [`PciHotplugConfig::buses`]) |
//! | 0x4 | insert | `PINS` | device checks pending; write 1 to acknowledge |
//! | 0x8 | remove | `PREM` | eject requests pending; write 1 to acknowledge |
//! | 0xC | eject  | `PEJ0` | `_EJ0` writes `1 << device` |
//! | 0x10 | bus check | `PBCK` | devices that vanished (surprise removal); write 1 to acknowledge |
//! | 0x14 | pending | `PPND` | bit `b`: bus `b` (0..=31) has something pending in one of the three above; read-only |
//!
//! The generated namespace:
//!
//! ```text
//! \_SB.PCI0
//!     OperationRegion (PHPR, SystemIO, port, 0x18)
//!     Field (PHPR, DWordAcc) { PSEL, PINS, PREM, PEJ0, PBCK, PPND }
//!     Mutex (PHPM)                       // the select register is shared state
//!     Method (PCEJ, 2) { PSEL = Arg0; PEJ0 = 1 << Arg1 }          // under PHPM
//!     Method (PSCN) {
//!         Local3 = PPND
//!         // for every bus b (buses from 32 on are scanned unasked):
//!         If (Local3 & (1 << b)) {
//!             PSEL = b; Local0 = PINS; Local1 = PREM; Local2 = PBCK    // under PHPM
//!             PINS = Local0; PREM = Local1; PBCK = Local2                // acknowledge
//!             If (Local2) { Notify (<bus b's parent: PCI0 or RPnn>, 0) }   // Bus Check
//!             If (Local0 & <slots>) { ...halves... If (Local0 & (1 << d)) { Notify (<slot d>, 1) } }
//!             If (Local1 & <slots>) { ...halves... If (Local1 & (1 << d)) { Notify (<slot d>, 3) } }
//!         }
//!     }
//!     Device (SLdd) { _ADR (dd << 16), _SUN, Method (_EJ0, 1) { PCEJ (b, dd) } }   // root bus
//!     Device (RPnn) { _ADR, Device (SL00) { _ADR 0, _SUN, _EJ0 } }   // a root port's slot
//! \_SB.GED_   ACPI0013, _CRS Interrupt (Edge, ActiveHigh) { gsi }, Method (_EVT, 1) { PSCN () }
//! ```
//!
//! `PSCN` does as little as it can, because every AML statement costs: where the guest kernel
//! runs slowly (on PVM hosts, 5 to 10 ms a statement in Linux's interpreter, an `If` included)
//! a scan of every bus and slot took 0.3 s of a hot-add, and acpiphp's work waits for the GED's
//! (real-time) interrupt thread to finish `_EVT`. It selects only the buses [`REG_PENDING`]
//! names, and finds a bus's pending slots by testing halves of its slot set before their
//! members: one slot among 15 takes 9 tests instead of 15, none takes one.
//!
//! No slot has `_STA`: Linux's ACPI core only creates (and acpiphp only registers) slot
//! devices that are present at boot, and a slot without `_STA` always is; acpiphp then tells an
//! empty slot from an occupied one by reading the function's vendor ID, as it does on QEMU.
//!
//! A surprise removal needs the Bus Check on the slot's parent: on a slot device Linux's
//! acpiphp only looks for new functions (`acpiphp_rescan_slot`), while a Bus Check on the
//! bridge (`acpiphp_check_bridge`, reached for `PCI0` through the host bridge's
//! `scan_dependent`) re-checks every slot and disables those whose vendor ID reads all-ones.

use acpi_tables::aml::{
    self, Acquire, And, Arg, Device, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule,
    If, Interrupt, Local, Method, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path, Release,
    ResourceTemplate, ShiftLeft, Store,
};
use acpi_tables::{Aml, AmlSink};

use crate::Error;

pub use platform::acpi_hotplug::{
    ACPI_HOTPLUG_PORTS as PCI_HOTPLUG_PORTS, NOTIFY_BUS_CHECK, NOTIFY_DEVICE_CHECK,
    NOTIFY_EJECT_REQUEST, REG_BUS_CHECK, REG_EJECT, REG_INSERT, REG_PENDING, REG_REMOVE,
    REG_SELECT,
};

/// Where a bus's slots sit in the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotParent {
    /// The host bridge's own bus: slot devices are children of `\_SB.PCI0`.
    RootBus,
    /// The secondary bus of a root port at `device.function` of the root bus: the DSDT gets a
    /// device `RPnn` (`nn` = [`SlotParent::RootPort::index`] in hex) for the port, the slot
    /// device under it.
    RootPort {
        /// Number used in the port's ACPI name `RPnn` (0..=255).
        index: u8,
        /// The port's device number on the root bus.
        device: u8,
        /// The port's function number.
        function: u8,
    },
}

/// One hot-pluggable slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiSlot {
    /// Device number on its bus (0..=31).
    pub device: u8,
    /// Physical slot number (`_SUN`): Linux names the slot in /sys/bus/pci/slots after it, so
    /// it should be unique in the machine.
    pub sun: u32,
}

/// The hot-pluggable slots of one bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiHotplugBus {
    /// Where the bus is.
    pub parent: SlotParent,
    /// Its slots.
    pub slots: Vec<AcpiSlot>,
}

/// ACPI PCI hot-plug as the DSDT describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHotplugConfig {
    /// First port of the register block ([`PCI_HOTPLUG_PORTS`] ports, reserved in the
    /// motherboard resources).
    pub port: u16,
    /// GSI of the Generic Event Device (edge-triggered, active high).
    pub gsi: u32,
    /// The buses; the index of each is its bus select value.
    pub buses: Vec<AcpiHotplugBus>,
}

impl PciHotplugConfig {
    /// Bit masks of the hot-pluggable device numbers, one per bus: what the register block's
    /// model needs to know.
    pub fn hotpluggable_masks(&self) -> Vec<u32> {
        self.buses
            .iter()
            .map(|b| b.slots.iter().fold(0, |m, s| m | 1 << s.device))
            .collect()
    }

    /// Checks for things the AML cannot express.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.buses.len() > 256 {
            return bad(format!(
                "{} ACPI hot-plug buses, at most 256",
                self.buses.len()
            ));
        }
        let mut ports = std::collections::BTreeSet::new();
        for (i, bus) in self.buses.iter().enumerate() {
            if let SlotParent::RootPort {
                index,
                device,
                function,
            } = bus.parent
            {
                if device > 31 || function > 7 {
                    return bad(format!(
                        "root port {device}.{function} is not a PCI address"
                    ));
                }
                if !ports.insert(index) {
                    return bad(format!(
                        "two ACPI hot-plug buses use root port name RP{index:02X}"
                    ));
                }
            }
            let mut seen = 0u32;
            for s in &bus.slots {
                if s.device > 31 || seen & 1 << s.device != 0 {
                    return bad(format!(
                        "ACPI hot-plug bus {i}: device number {} is out of range or repeated",
                        s.device
                    ));
                }
                seen |= 1 << s.device;
            }
        }
        Ok(())
    }

    /// The objects to place in `\_SB.PCI0`: register block, methods, slot and root port
    /// devices.
    pub fn host_bridge_aml(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.registers_and_methods(&mut out);
        for (sel, bus) in self.buses.iter().enumerate() {
            match bus.parent {
                SlotParent::RootBus => {
                    for slot in &bus.slots {
                        slot_device(sel as u8, slot, &mut out);
                    }
                }
                SlotParent::RootPort {
                    index,
                    device,
                    function,
                } => {
                    let mut slots = Vec::new();
                    for slot in &bus.slots {
                        slot_device(sel as u8, slot, &mut slots);
                    }
                    let raw = crate::dsdt::RawAml(slots);
                    let adr = Name::new(
                        "_ADR".into(),
                        &(u32::from(device) << 16 | u32::from(function)),
                    );
                    Device::new(port_name(index).as_str().into(), vec![&adr, &raw])
                        .to_aml_bytes(&mut out);
                }
            }
        }
        out
    }

    fn registers_and_methods(&self, sink: &mut dyn AmlSink) {
        OpRegion::new(
            "PHPR".into(),
            OpRegionSpace::SystemIO,
            &self.port,
            &PCI_HOTPLUG_PORTS,
        )
        .to_aml_bytes(sink);
        aml::Field::new(
            "PHPR".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Named(*b"PSEL", 32),
                FieldEntry::Named(*b"PINS", 32),
                FieldEntry::Named(*b"PREM", 32),
                FieldEntry::Named(*b"PEJ0", 32),
                FieldEntry::Named(*b"PBCK", 32),
                FieldEntry::Named(*b"PPND", 32),
            ],
        )
        .to_aml_bytes(sink);
        aml::Mutex::new("PHPM".into(), 0).to_aml_bytes(sink);

        // PCEJ (bus, device): the eject register write of a slot's _EJ0.
        let psel = Path::new("PSEL");
        let pej0 = Path::new("PEJ0");
        let acquire = Acquire::new("PHPM".into(), 0xffff);
        let release = Release::new("PHPM".into());
        let select = Store::new(&psel, &Arg(0));
        let eject = ShiftLeft::new(&pej0, &aml::ONE, &Arg(1));
        Method::new(
            "PCEJ".into(),
            2,
            true,
            vec![&acquire, &select, &eject, &release],
        )
        .to_aml_bytes(sink);

        // PSCN: read, acknowledge and act on the pending events of every bus that has some.
        let pending_buses = Local(3);
        let mut body = Vec::new();
        Store::new(&pending_buses, &Path::new("PPND")).to_aml_bytes(&mut body);
        for (sel, bus) in self.buses.iter().enumerate() {
            let sel = sel as u8;
            let mut scan = Vec::new();
            scan_bus(sel, bus, &mut scan);
            let scan = crate::dsdt::RawAml(scan);
            if sel < 32 {
                let bit = 1u32 << sel;
                let test = And::new(&aml::ZERO, &pending_buses, &bit);
                If::new(&test, vec![&scan]).to_aml_bytes(&mut body);
            } else {
                scan.to_aml_bytes(&mut body);
            }
        }
        let body = crate::dsdt::RawAml(body);
        Method::new("PSCN".into(), 0, true, vec![&body]).to_aml_bytes(sink);
    }

    /// The Generic Event Device `GED_`, to place in `\_SB`.
    pub fn ged_aml(&self) -> Vec<u8> {
        let hid = Name::new("_HID".into(), &"ACPI0013");
        let uid = Name::new("_UID".into(), &aml::ZERO);
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
        let scan = MethodCall::new("\\_SB_.PCI0.PSCN".into(), vec![]);
        let evt = Method::new("_EVT".into(), 1, true, vec![&scan]);
        let mut out = Vec::new();
        Device::new("GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(&mut out);
        out
    }
}

/// One bus's part of `PSCN`: select it, read and acknowledge its pending events, notify.
fn scan_bus(sel: u8, bus: &AcpiHotplugBus, sink: &mut dyn AmlSink) {
    let psel = Path::new("PSEL");
    let pins = Path::new("PINS");
    let prem = Path::new("PREM");
    let pbck = Path::new("PBCK");
    let (inserted, removed, vanished) = (Local(0), Local(1), Local(2));
    Acquire::new("PHPM".into(), 0xffff).to_aml_bytes(sink);
    Store::new(&psel, &sel).to_aml_bytes(sink);
    Store::new(&inserted, &pins).to_aml_bytes(sink);
    Store::new(&removed, &prem).to_aml_bytes(sink);
    Store::new(&vanished, &pbck).to_aml_bytes(sink);
    Store::new(&pins, &inserted).to_aml_bytes(sink);
    Store::new(&prem, &removed).to_aml_bytes(sink);
    Store::new(&pbck, &vanished).to_aml_bytes(sink);
    Release::new("PHPM".into()).to_aml_bytes(sink);
    let parent = Path::new(&parent_path(&bus.parent));
    let bus_check = Notify::new(&parent, &NOTIFY_BUS_CHECK);
    If::new(&vanished, vec![&bus_check]).to_aml_bytes(sink);
    let mut slots = bus.slots.clone();
    slots.sort_by_key(|s| s.device);
    for (pending, value) in [
        (&inserted, NOTIFY_DEVICE_CHECK),
        (&removed, NOTIFY_EJECT_REQUEST),
    ] {
        notify_pending(&bus.parent, &slots, pending, value, sink);
    }
}

/// `If (pending & <slots>) { ... }`: notifies each of `slots` (sorted by device number) whose
/// bit is set in `pending`, testing halves of the set before its members, so that finding one
/// slot among n takes about 2·log2(n) tests and finding none takes one.
fn notify_pending(
    parent: &SlotParent,
    slots: &[AcpiSlot],
    pending: &Local,
    value: u8,
    sink: &mut dyn AmlSink,
) {
    let mask = slots.iter().fold(0u32, |m, s| m | 1 << s.device);
    let test = And::new(&aml::ZERO, pending, &mask);
    let mut body = Vec::new();
    match slots {
        [] => return,
        [slot] => {
            let path = Path::new(&slot_path(parent, slot.device));
            Notify::new(&path, &value).to_aml_bytes(&mut body);
        }
        _ => {
            let (low, high) = slots.split_at(slots.len() / 2);
            notify_pending(parent, low, pending, value, &mut body);
            notify_pending(parent, high, pending, value, &mut body);
        }
    }
    let body = crate::dsdt::RawAml(body);
    If::new(&test, vec![&body]).to_aml_bytes(sink);
}

/// `RPnn`.
fn port_name(index: u8) -> String {
    format!("RP{index:02X}")
}

/// `SLdd`.
fn slot_name(device: u8) -> String {
    format!("SL{device:02X}")
}

/// Absolute path of the object whose secondary bus holds the slots: the host bridge or a
/// root port.
fn parent_path(parent: &SlotParent) -> String {
    match parent {
        SlotParent::RootBus => "\\_SB_.PCI0".to_string(),
        SlotParent::RootPort { index, .. } => format!("\\_SB_.PCI0.{}", port_name(*index)),
    }
}

/// Absolute path of a slot device.
fn slot_path(parent: &SlotParent, device: u8) -> String {
    format!("{}.{}", parent_path(parent), slot_name(device))
}

fn slot_device(sel: u8, slot: &AcpiSlot, sink: &mut dyn AmlSink) {
    let adr = Name::new("_ADR".into(), &(u32::from(slot.device) << 16));
    let sun = Name::new("_SUN".into(), &slot.sun);
    let device = slot.device;
    let call = MethodCall::new("PCEJ".into(), vec![&sel, &device]);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&call]);
    Device::new(
        slot_name(slot.device).as_str().into(),
        vec![&adr, &sun, &ej0],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciHotplugConfig {
        PciHotplugConfig {
            port: 0x620,
            gsi: 5,
            buses: vec![
                AcpiHotplugBus {
                    parent: SlotParent::RootBus,
                    slots: (1..16)
                        .map(|d| AcpiSlot {
                            device: d,
                            sun: 32 + u32::from(d),
                        })
                        .collect(),
                },
                AcpiHotplugBus {
                    parent: SlotParent::RootPort {
                        index: 1,
                        device: 0x11,
                        function: 0,
                    },
                    slots: vec![AcpiSlot { device: 0, sun: 1 }],
                },
            ],
        }
    }

    fn find(b: &[u8], n: &[u8]) -> bool {
        b.windows(n.len()).any(|w| w == n)
    }

    #[test]
    fn masks_follow_the_slots() {
        assert_eq!(config().hotpluggable_masks(), [0xfffe, 1]);
    }

    #[test]
    fn every_slot_gets_a_device_with_ej0() {
        let aml = config().host_bridge_aml();
        for d in 1..16u8 {
            assert!(find(&aml, slot_name(d).as_bytes()), "SL{d:02X}");
        }
        assert!(find(&aml, b"RP01"));
        assert!(find(&aml, b"_EJ0") && find(&aml, b"_SUN") && find(&aml, b"PSCN"));
        assert!(find(&aml, b"PBCK"));
        let ged = config().ged_aml();
        assert!(find(&ged, b"ACPI0013") && find(&ged, b"_EVT"));
    }

    #[test]
    fn validation() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.buses[0].slots.push(AcpiSlot { device: 1, sun: 99 });
        assert!(c.validate().is_err());
        let mut c = config();
        c.buses[0].slots.push(AcpiSlot {
            device: 32,
            sun: 99,
        });
        assert!(c.validate().is_err());
        let mut c = config();
        c.buses.push(c.buses[1].clone());
        assert!(c.validate().is_err());
    }
}
