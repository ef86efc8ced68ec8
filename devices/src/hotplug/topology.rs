//! Where hot-pluggable functions sit, and how each place is named: the root bus `pcie.0`, whose
//! device numbers [`FIRST_ROOT_BUS_SLOT`].. are ACPI hot-plug slots, and root ports `rpN` at
//! 00:(0x10 + N).0, each with one slot, driven natively or through ACPI ([`PortMode`]).
//!
//! The ACPI hot-plug controller numbers its buses (the value the guest's AML writes to the
//! bus select register): 0 is the root bus, 1, 2, ... the ACPI-mode root ports in port order.
//! [`Topology::acpi_select`] is the one place that numbering is made.

use std::fmt;

use super::policy::PortMode;

/// Device number of root port rp0 on the root bus; rpN is at `FIRST_ROOT_PORT_SLOT + N`.
pub const FIRST_ROOT_PORT_SLOT: u8 = 0x10;
/// Device numbers from this one up to (not including) [`FIRST_ROOT_PORT_SLOT`] of the root bus
/// are ACPI hot-plug slots.
pub const FIRST_ROOT_BUS_SLOT: u8 = 1;
pub use platform::acpi_hotplug::ROOT_BUS_SELECT;
/// The root bus's name on the control socket.
pub const ROOT_BUS_NAME: &str = "pcie.0";

/// Physical slot number (`_SUN`) of root bus device `device`: 32 + device, so that it never
/// collides with a root port's (rpN has slot number N).
pub fn root_bus_slot_number(device: u8) -> u32 {
    32 + u32::from(device)
}

/// A bus hot-plug commands name: the root bus, or the bus below root port `rpN`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum BusId {
    /// `pcie.0`.
    RootBus,
    /// `rpN`: the slot of root port N.
    Port(u8),
}

impl fmt::Display for BusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusId::RootBus => f.write_str(ROOT_BUS_NAME),
            BusId::Port(n) => write!(f, "rp{n}"),
        }
    }
}

impl std::str::FromStr for BusId {
    type Err = String;

    /// `pcie.0` or `rpN` (N decimal, no sign or leading zeros); anything else is refused with
    /// the control socket's message for an unknown bus.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == ROOT_BUS_NAME {
            return Ok(BusId::RootBus);
        }
        let not_found = || format!("Bus '{s}' not found");
        let digits = s.strip_prefix("rp").ok_or_else(not_found)?;
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        match digits.parse::<u8>() {
            Ok(n) if canonical => Ok(BusId::Port(n)),
            _ => Err(not_found()),
        }
    }
}

/// A slot a function can occupy.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum SlotId {
    /// Device `.0` of the root bus (function 0): an ACPI hot-plug slot, or a cold-plugged
    /// device's place.
    RootBus(u8),
    /// The slot of root port N (its device 0, function 0).
    Port(u8),
}

impl SlotId {
    /// The bus the slot is on.
    pub fn bus(self) -> BusId {
        match self {
            SlotId::RootBus(_) => BusId::RootBus,
            SlotId::Port(n) => BusId::Port(n),
        }
    }

    /// The physical slot number the guest sees (`_SUN`, Slot Capabilities).
    pub fn number(self) -> u32 {
        match self {
            SlotId::RootBus(d) => root_bus_slot_number(d),
            SlotId::Port(n) => u32::from(n),
        }
    }

    /// The device number within its bus.
    pub fn device(self) -> u8 {
        match self {
            SlotId::RootBus(d) => d,
            SlotId::Port(_) => 0,
        }
    }
}

/// QEMU's `addr` argument ("5", "0x5", "05.0"): device and function numbers, in hex, with the
/// text as given (messages quote it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceAddr {
    /// The argument as the client wrote it.
    pub text: String,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl std::str::FromStr for DeviceAddr {
    type Err = String;

    fn from_str(addr: &str) -> Result<Self, String> {
        let (dev, func) = addr.split_once('.').unwrap_or((addr, "0"));
        let parse = |s: &str| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        match (parse(dev), parse(func)) {
            (Some(device), Some(function)) if device < 32 && function < 8 => Ok(DeviceAddr {
                text: addr.to_string(),
                device,
                function,
            }),
            _ => Err(format!(
                "Parameter 'addr' expects a PCI address such as '0' or '00.0', not '{addr}'"
            )),
        }
    }
}

/// One bus of the ACPI hot-plug controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiBus {
    /// Its bus select value.
    pub select: u8,
    /// The bus.
    pub bus: BusId,
    /// Its hot-pluggable slots.
    pub slots: Vec<SlotId>,
}

/// The machine's hot-plug places: its root ports and their modes, and whether the root bus has
/// ACPI hot-plug slots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    ports: Vec<PortMode>,
    root_bus_hotplug: bool,
}

impl Topology {
    /// Root ports rp0.. in `ports`' modes; the root bus's slots [`FIRST_ROOT_BUS_SLOT`].. are
    /// ACPI hot-plug slots if `root_bus_hotplug`.
    pub fn new(ports: &[PortMode], root_bus_hotplug: bool) -> Self {
        Topology {
            ports: ports.to_vec(),
            root_bus_hotplug,
        }
    }

    /// Number of root ports.
    pub fn port_count(&self) -> u8 {
        u8::try_from(self.ports.len()).unwrap_or(u8::MAX)
    }

    /// The mode of root port `n`, if it exists.
    pub fn port_mode(&self, n: u8) -> Option<PortMode> {
        self.ports.get(usize::from(n)).copied()
    }

    /// Whether bus `bus` exists.
    pub fn has_bus(&self, bus: BusId) -> bool {
        match bus {
            BusId::RootBus => true,
            BusId::Port(n) => self.port_mode(n).is_some(),
        }
    }

    /// Whether the root bus has ACPI hot-plug slots.
    pub fn root_bus_hotplug(&self) -> bool {
        self.root_bus_hotplug
    }

    /// Whether device `device` of the root bus is an ACPI hot-plug slot.
    pub fn is_root_bus_slot(&self, device: u8) -> bool {
        self.root_bus_hotplug && (FIRST_ROOT_BUS_SLOT..FIRST_ROOT_PORT_SLOT).contains(&device)
    }

    /// The ACPI hot-plug controller's (bus select, device number) of `slot`: a root bus slot, or
    /// the slot of a root port in ACPI mode; `None` for a native port's slot (or a root bus
    /// without ACPI hot-plug).
    pub fn acpi_select(&self, slot: SlotId) -> Option<(u8, u8)> {
        match slot {
            SlotId::RootBus(d) => self.root_bus_hotplug.then_some((ROOT_BUS_SELECT, d)),
            SlotId::Port(n) => {
                if self.port_mode(n)? != PortMode::Acpi {
                    return None;
                }
                let before = self.ports[..usize::from(n)]
                    .iter()
                    .filter(|m| **m == PortMode::Acpi)
                    .count();
                Some((ROOT_BUS_SELECT + 1 + u8::try_from(before).ok()?, 0))
            }
        }
    }

    /// The slot device `device` of ACPI hot-plug bus `select` stands for, if any.
    pub fn acpi_slot(&self, select: u8, device: u8) -> Option<SlotId> {
        if select == ROOT_BUS_SELECT {
            return self
                .is_root_bus_slot(device)
                .then_some(SlotId::RootBus(device));
        }
        if device != 0 {
            return None;
        }
        (0..self.port_count())
            .find(|&n| self.acpi_select(SlotId::Port(n)) == Some((select, 0)))
            .map(SlotId::Port)
    }

    /// Every ACPI hot-plug bus, in bus select order (the index of each is its select value):
    /// the root bus (its slots empty without root bus hot-plug), then each ACPI-mode port's.
    /// The controller's buses and the DSDT's slot devices are both built from this.
    pub fn acpi_buses(&self) -> Vec<AcpiBus> {
        let root = AcpiBus {
            select: ROOT_BUS_SELECT,
            bus: BusId::RootBus,
            slots: (FIRST_ROOT_BUS_SLOT..FIRST_ROOT_PORT_SLOT)
                .filter(|_| self.root_bus_hotplug)
                .map(SlotId::RootBus)
                .collect(),
        };
        std::iter::once(root)
            .chain((0..self.port_count()).filter_map(|n| {
                let (select, _) = self.acpi_select(SlotId::Port(n))?;
                Some(AcpiBus {
                    select,
                    bus: BusId::Port(n),
                    slots: vec![SlotId::Port(n)],
                })
            }))
            .collect()
    }

    /// The hot-pluggable device numbers of every ACPI hot-plug bus, one mask per bus select
    /// value.
    pub fn acpi_hotpluggable_masks(&self) -> Vec<u32> {
        self.acpi_buses()
            .iter()
            .map(|b| b.slots.iter().fold(0u32, |m, s| m | 1 << s.device()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_names_parse_once_and_print_back() {
        assert_eq!("pcie.0".parse::<BusId>().unwrap(), BusId::RootBus);
        assert_eq!("rp0".parse::<BusId>().unwrap(), BusId::Port(0));
        assert_eq!("rp12".parse::<BusId>().unwrap(), BusId::Port(12));
        for bad in [
            "rp", "rp01", "rp-1", "rp+1", "rp256", "pcie.1", "RP0", " rp0", "",
        ] {
            assert_eq!(
                bad.parse::<BusId>().unwrap_err(),
                format!("Bus '{bad}' not found")
            );
        }
        for b in [BusId::RootBus, BusId::Port(0), BusId::Port(255)] {
            assert_eq!(b.to_string().parse::<BusId>().unwrap(), b);
        }
    }

    #[test]
    fn addresses_in_qemu_syntax() {
        let a: DeviceAddr = "0a.0".parse().unwrap();
        assert_eq!((a.device, a.function), (10, 0));
        let a: DeviceAddr = "0x1f.7".parse().unwrap();
        assert_eq!((a.device, a.function), (31, 7));
        for bad in ["20", "0.8", "zz", "", "1.x"] {
            assert!(bad.parse::<DeviceAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bus_select_numbering_is_root_bus_then_acpi_ports_in_order() {
        use PortMode::*;
        let t = Topology::new(&[Native, Acpi, Native, Acpi], true);
        assert_eq!(t.acpi_select(SlotId::RootBus(5)), Some((0, 5)));
        assert_eq!(t.acpi_select(SlotId::Port(0)), None);
        assert_eq!(t.acpi_select(SlotId::Port(1)), Some((1, 0)));
        assert_eq!(t.acpi_select(SlotId::Port(3)), Some((2, 0)));
        assert_eq!(t.acpi_select(SlotId::Port(4)), None);
        assert_eq!(t.acpi_slot(2, 0), Some(SlotId::Port(3)));
        assert_eq!(t.acpi_slot(2, 1), None);
        assert_eq!(t.acpi_slot(3, 0), None);
        assert_eq!(t.acpi_slot(0, 15), Some(SlotId::RootBus(15)));
        assert_eq!(t.acpi_slot(0, 16), None, "rp0's own device number");
        assert_eq!(t.acpi_slot(0, 0), None, "the host bridge");
        assert_eq!(t.acpi_hotpluggable_masks(), vec![0xfffe, 1, 1]);
        let buses = t.acpi_buses();
        for (i, b) in buses.iter().enumerate() {
            assert_eq!(usize::from(b.select), i, "index is select");
            for s in &b.slots {
                assert_eq!(t.acpi_select(*s), Some((b.select, s.device())));
                assert_eq!(t.acpi_slot(b.select, s.device()), Some(*s));
            }
        }
        assert_eq!(buses[2].bus, BusId::Port(3));
        let no_acpi = Topology::new(&[Native], false);
        assert_eq!(no_acpi.acpi_select(SlotId::RootBus(1)), None);
        assert_eq!(no_acpi.acpi_hotpluggable_masks(), vec![0]);
    }
}
