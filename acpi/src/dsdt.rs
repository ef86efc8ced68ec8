//! The Differentiated System Description Table.
//!
//! Layout of the namespace it defines:
//!
//! ```text
//! \_S5_            Package (4) { SLP_TYP_S5, 0, 0, 0 }   power off
//! \_SB_.PCI0       the PCIe host bridge (see host_bridge), its ACPI hot-plug slots (see
//!                  pci_hotplug), then DsdtExtras::host_bridge
//! \_SB_.MRES       PNP0C02 motherboard resources: the ECAM window and the
//!                  platform I/O registers (sleep, reset, _OSC report)
//! \_SB_.COM1       PNP0501 16550 UART, when MachineConfig::serial is set
//! \_SB_.GED_       ACPI0013 Generic Event Device, with MachineConfig::pci_hotplug
//! \_SB_.*          DsdtExtras::system_bus (e.g. a Generic Event Device)
//! \*               DsdtExtras::root
//! ```

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use crate::fadt::SLP_TYP_S5;
use crate::host_bridge::HostBridge;
use crate::{MachineConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DSDT revision: 2 and above means 64-bit AML integers.
pub const DSDT_REVISION: u8 = 2;

/// Extra AML objects to put into the DSDT.
#[derive(Default)]
pub struct DsdtExtras<'a> {
    /// Objects placed inside `\_SB.PCI0` after the host bridge's own objects:
    /// root ports and ACPI hotplug slots (`Device`s with `_ADR`, `_SUN`,
    /// `_EJ0`), and the methods and operation regions they use.
    pub host_bridge: Vec<&'a dyn Aml>,
    /// Objects placed in the `\_SB` scope after `PCI0` and the motherboard
    /// resources device, e.g. a Generic Event Device (`ACPI0013`).
    pub system_bus: Vec<&'a dyn Aml>,
    /// Objects placed at the root of the namespace, after `\_S5`.
    pub root: Vec<&'a dyn Aml>,
}

/// Pre-serialized AML, for callers that build AML objects in a helper and
/// need to keep them past the lifetime of the objects' borrowed children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawAml(pub Vec<u8>);

impl RawAml {
    /// Serializes `aml`.
    pub fn from_aml(aml: &dyn Aml) -> Self {
        let mut bytes = Vec::new();
        aml.to_aml_bytes(&mut bytes);
        RawAml(bytes)
    }
}

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Merges `(first port, length)` ranges into sorted, non-overlapping,
/// non-adjacent `(first port, length)` ranges, each at most 255 ports long
/// (the limit of an `IO` descriptor).
fn merge_port_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u8)> {
    let mut spans: Vec<(u32, u32)> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(start, len)| (u32::from(start), u32::from(start) + u32::from(len)))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = Vec::new();
    for (mut start, end) in merged {
        while start < end {
            let len = (end - start).min(u32::from(u8::MAX));
            out.push((start as u16, len as u8));
            start += len;
        }
    }
    out
}

/// The `PNP0C02` motherboard resources device `MRES`: reserves the ECAM
/// window (without it Linux reports the MMCONFIG area as not reserved and
/// may stop using it) and the platform I/O registers.
struct MotherboardResources<'a>(&'a MachineConfig);

impl Aml for MotherboardResources<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let cfg = self.0;
        let (ecam_start, ecam_end) = cfg.pci.ecam_range();
        let ecam32 = (ecam_end <= 1 << 32).then(|| {
            aml::Memory32Fixed::new(true, ecam_start as u32, (ecam_end - ecam_start) as u32)
        });
        let ecam64 = AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            ecam_start,
            ecam_end - 1,
            None,
        );
        let ports: Vec<(u16, u16)> = cfg
            .platform_ports()
            .into_iter()
            .map(|(_, start, len)| (start, len))
            .collect();
        let ios: Vec<aml::IO> = merge_port_ranges(&ports)
            .into_iter()
            .map(|(start, len)| aml::IO::new(start, start, 1, len))
            .collect();

        let mut resources: Vec<&dyn Aml> = Vec::new();
        match &ecam32 {
            Some(m) => resources.push(m),
            None => resources.push(&ecam64),
        }
        for io in &ios {
            resources.push(io);
        }

        let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
        let uid = Name::new("_UID".into(), &aml::ZERO);
        let crs = Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
        Device::new("MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// The `PNP0501` device `COM1`: a 16550 at `port` (8 ports) raising `gsi`.
struct SerialPort {
    port: u16,
    gsi: u32,
}

impl Aml for SerialPort {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
        let uid = Name::new("_UID".into(), &aml::ZERO);
        let io = aml::IO::new(self.port, self.port, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        let crs = Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// Builds the DSDT for `cfg` (which must have passed
/// [`MachineConfig::validate`]) with `extras` added.
pub fn build_dsdt(cfg: &MachineConfig, extras: &DsdtExtras<'_>) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );

    // Hardware-reduced power off: Linux writes (SLP_TYP << 2) | SLP_EN to the
    // FADT sleep control register, with SLP_TYP the first element of \_S5.
    let s5 = Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let hotplug = cfg
        .pci_hotplug
        .as_ref()
        .map(|hp| (RawAml(hp.host_bridge_aml()), RawAml(hp.ged_aml())));
    let mut bridge_children = extras.host_bridge.clone();
    if let Some((slots, _)) = &hotplug {
        bridge_children.insert(0, slots);
    }
    let host_bridge = HostBridge::new(&cfg.pci, bridge_children);
    let mres = MotherboardResources(cfg);
    let serial = cfg.serial.map(|(port, gsi)| SerialPort { port, gsi });
    let mut sb_children: Vec<&dyn Aml> = vec![&host_bridge, &mres];
    if let Some(serial) = &serial {
        sb_children.push(serial);
    }
    if let Some((_, ged)) = &hotplug {
        sb_children.push(ged);
    }
    sb_children.extend_from_slice(&extras.system_bus);
    let sb = aml::Scope::new("\\_SB_".into(), sb_children);

    let mut body: Vec<&dyn Aml> = vec![&s5, &sb];
    body.extend_from_slice(&extras.root);
    let mut bytes = Vec::new();
    for object in body {
        object.to_aml_bytes(&mut bytes);
    }
    dsdt.append_slice(&bytes);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    #[test]
    fn describes_the_console_uart_only_when_asked() {
        let mut cfg = crate::MachineConfig::default();
        let with = super::build_dsdt(&cfg, &super::DsdtExtras::default());
        // PNP0501 as an EISA id: 0x41d0 0x0105 (compressed "PNP", then 0x0501 byte-swapped).
        let eisa = [0x41, 0xd0, 0x05, 0x01];
        let find = |b: &[u8], n: &[u8]| b.windows(n.len()).any(|w| w == n);
        assert!(find(&with, b"COM1") && find(&with, &eisa));
        cfg.serial = None;
        let without = super::build_dsdt(&cfg, &super::DsdtExtras::default());
        assert!(!find(&without, b"COM1") && !find(&without, &eisa));
    }

    use super::merge_port_ranges;

    #[test]
    fn port_ranges_merge() {
        assert_eq!(
            merge_port_ranges(&[(0x601, 1), (0x600, 1), (0x602, 1), (0x610, 8)]),
            [(0x600, 3), (0x610, 8)]
        );
        assert_eq!(merge_port_ranges(&[(0x3c0, 1), (0x3c0, 1)]), [(0x3c0, 1)]);
        assert_eq!(
            merge_port_ranges(&[(0x100, 8), (0x104, 8), (0x10c, 1)]),
            [(0x100, 13)]
        );
        assert_eq!(merge_port_ranges(&[(0xFFF8, 8)]), [(0xFFF8, 8)]);
        assert_eq!(
            merge_port_ranges(&[(0x1000, 300)]),
            [(0x1000, 255), (0x10FF, 45)]
        );
    }
}
