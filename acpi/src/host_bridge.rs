//! The PCIe host bridge `\_SB.PCI0`: identification, resources (`_CRS`),
//! legacy interrupt routing (`_PRT`) and the `_OSC` method through which the
//! guest negotiates control of PCIe features (native hotplug, PME, AER, ...).
//!
//! [`HostBridge`] is an [`Aml`] object taking a list of child objects, so that
//! root ports and ACPI hotplug slots (`Device`s with `_ADR`, `_SUN`, `_EJ0`)
//! can be placed under it.
//!
//! The bridge has no `_ADR`: a device needs `_HID` or `_ADR` but not both
//! (ACPI 6.x §6.1; iasl warns "Device object requires either a _HID or _ADR,
//! but not both"), and a host bridge is found by its `_HID`. QEMU dropped its
//! `_ADR (0)` for the same reason.
//!
//! # `_OSC`
//!
//! The generated method follows ACPI 6.x §6.2.11 and the PCI Firmware
//! Specification 3.3 §4.5 (the design mirrors QEMU's q35 `_OSC`):
//!
//! ```text
//! Method (_OSC, 4, Serialized) {
//!     CreateDWordField (Arg3, 0, CDW1)
//!     If (Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766")) {
//!         OSTA = CDW1                                     // only with a report port
//!         If (Arg2 < 3) { CDW1 |= 0x02; Return (Arg3) }   // _OSC failure: no control dword
//!         CreateDWordField (Arg3, 4, CDW2)                // support field
//!         CreateDWordField (Arg3, 8, CDW3)                // control field
//!         SUPP = CDW2
//!         Local0 = CDW3                                   // requested
//!         If (Arg1 != One) { CDW1 |= 0x08; Local1 = 0 }   // unknown revision: grant nothing
//!         Else { Local1 = Local0 & ALLOWED }              // granted
//!         OSUP = SUPP; OREQ = Local0                      // only with a report port
//!         OGNT = Local1                                   // (last: it completes the report)
//!         If (Local1 != Local0) { CDW1 |= 0x10 }          // capabilities masked
//!         CDW3 = Local1; CTRL = Local1
//!     } Else {
//!         CDW1 |= 0x04                                    // unrecognized UUID
//!     }
//!     Return (Arg3)
//! }
//! ```
//!
//! `ALLOWED` is [`OscConfig::allowed_control`]: PME, AER, PCIe capability
//! structure and LTR control always, PCIe native hotplug only when
//! [`OscConfig::grant_native_hotplug`] is set. SHPC native hotplug (bit 1) is
//! never granted: the machine has no SHPC controller. Neither is DPC (bit 7):
//! the root ports do not implement it. Linux asks with the query flag first,
//! sees the masked bits, asks again for what it was offered and then commits;
//! it prints `_OSC: OS now controls [...]` with the result.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, And, Arg, CreateDWordField, Device, EISAName, Else,
    Equal, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local,
    Method, Name, NotEqual, OpRegion, OpRegionSpace, Or, Package, Path, ResourceTemplate, Return,
    Store, Uuid,
};
use acpi_tables::{Aml, AmlSink};

use crate::Error;

/// UUID of the PCI host bridge `_OSC` interface (PCI Firmware Spec §4.5.1).
pub const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";

pub use platform::osc_report::{
    CDW1_CAPABILITIES_MASKED as OSC_CDW1_CAPABILITIES_MASKED, CDW1_FAILURE as OSC_CDW1_FAILURE,
    CDW1_QUERY as OSC_CDW1_QUERY, CDW1_UNRECOGNIZED_REVISION as OSC_CDW1_UNRECOGNIZED_REVISION,
    CDW1_UNRECOGNIZED_UUID as OSC_CDW1_UNRECOGNIZED_UUID, CTRL_DPC as OSC_CTRL_DPC,
    CTRL_LTR as OSC_CTRL_LTR, CTRL_PCIE_AER as OSC_CTRL_PCIE_AER,
    CTRL_PCIE_CAPABILITY as OSC_CTRL_PCIE_CAPABILITY,
    CTRL_PCIE_NATIVE_HP as OSC_CTRL_PCIE_NATIVE_HP, CTRL_PCIE_PME as OSC_CTRL_PCIE_PME,
    CTRL_SHPC_NATIVE_HP as OSC_CTRL_SHPC_NATIVE_HP, OSC_REPORT_PORTS as OSC_REPORT_LEN,
    REG_GRANTED as OSC_REPORT_GRANTED, REG_REQUESTED as OSC_REPORT_REQUESTED,
    REG_STATUS as OSC_REPORT_STATUS, REG_SUPPORT as OSC_REPORT_SUPPORT,
};

/// PCI legacy interrupt routing: INTA..INTD of slot `s` go to GSI
/// `PRT_GSI_BASE + (s + pin) % 4`.
pub const PRT_GSI_BASE: u32 = 16;

/// What the host bridge's `_OSC` grants and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OscConfig {
    /// Whether `_OSC` grants PCIe native hot plug control (bit 0 of the
    /// control dword). Without it, Linux's pciehp does not drive the root
    /// ports' slots.
    pub grant_native_hotplug: bool,
    /// If `Some(p)`, every `_OSC` evaluation for the PCI host bridge UUID
    /// writes CDW1 as the OS passed it to the 32-bit SystemIO register `p`,
    /// the support dword (CDW2) to `p + 4`, the control dword the OS requested
    /// (CDW3 on entry) to `p + 8` and, last, the control dword granted to
    /// `p + 12`, so the VMM can show what the guest asked for and got. Queries
    /// (CDW1 bit 0 set) are reported too; the last evaluation without the
    /// query flag is what the OS now controls. The ports `p..p+16` are
    /// reserved in the motherboard resources.
    pub report_port: Option<u16>,
}

impl Default for OscConfig {
    /// Grant native hotplug; report to ports 0x610..0x620.
    fn default() -> Self {
        OscConfig {
            grant_native_hotplug: true,
            report_port: Some(0x610),
        }
    }
}

impl OscConfig {
    /// The control bits `_OSC` grants when the OS asks for them: PME, AER,
    /// PCIe capability structure and LTR control, plus PCIe native hotplug if
    /// [`OscConfig::grant_native_hotplug`] (i.e. `0x3D`, or `0x3C` without
    /// native hotplug).
    pub fn allowed_control(&self) -> u32 {
        let mut allowed =
            OSC_CTRL_PCIE_PME | OSC_CTRL_PCIE_AER | OSC_CTRL_PCIE_CAPABILITY | OSC_CTRL_LTR;
        if self.grant_native_hotplug {
            allowed |= OSC_CTRL_PCIE_NATIVE_HP;
        }
        allowed
    }
}

/// Configuration of the PCIe host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBridgeConfig {
    /// PCI segment group (`_SEG`, MCFG segment).
    pub segment: u16,
    /// ECAM base: the address of bus 0's configuration space (1 MiB per bus),
    /// as in the MCFG, even if `bus_start` is not 0.
    pub ecam_base: u64,
    /// First bus number decoded by the host bridge (`_BBN`).
    pub bus_start: u8,
    /// Last bus number decoded by the host bridge.
    pub bus_end: u8,
    /// Inclusive `(base, last)` PCI I/O window the guest may assign BARs and
    /// bridge windows from. It is published as the second I/O window of the
    /// root bus (the first being `0x0000..=0x0CF7`, the legacy devices), so it
    /// must lie in `0x0D00..=0xFFFF`, above the configuration ports
    /// `0xCF8..=0xCFF`.
    pub io_window: (u16, u16),
    /// `(base, size)` of the 32-bit non-prefetchable MMIO window; must end at
    /// or below 4 GiB.
    pub mmio32: (u64, u64),
    /// `(base, size)` of the 64-bit MMIO window above RAM; a size of 0 leaves
    /// it out.
    pub mmio64: (u64, u64),
    /// `_OSC` behaviour.
    pub osc: OscConfig,
}

impl Default for HostBridgeConfig {
    /// Segment 0, ECAM at `0xE000_0000` for buses 0..=255, I/O window
    /// `0x1000..=0xFFFF`, 32-bit MMIO `0xC000_0000..0xE000_0000`, 64-bit MMIO
    /// 64 GiB at 64 GiB, default [`OscConfig`].
    fn default() -> Self {
        HostBridgeConfig {
            segment: 0,
            ecam_base: 0xE000_0000,
            bus_start: 0,
            bus_end: 255,
            io_window: (0x1000, 0xFFFF),
            mmio32: (0xC000_0000, 0x2000_0000),
            mmio64: (0x10_0000_0000, 0x10_0000_0000),
            osc: OscConfig::default(),
        }
    }
}

/// Ports `0xCF8..=0xCFF` (PCI configuration mechanism #1) are never part of
/// a root bus I/O window.
const FIRST_IO_WINDOW: (u16, u16) = (0x0000, 0x0CF7);
const SECOND_IO_WINDOW_MIN: u16 = 0x0D00;

impl HostBridgeConfig {
    /// The guest-physical range `[start, end)` of ECAM space for
    /// `bus_start..=bus_end`.
    pub fn ecam_range(&self) -> (u64, u64) {
        let start = self.ecam_base + (u64::from(self.bus_start) << 20);
        let end = self.ecam_base + ((u64::from(self.bus_end) + 1) << 20);
        (start, end)
    }

    /// Checks that the windows are well-formed and do not overlap.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.bus_start > self.bus_end {
            return bad(format!(
                "PCI bus range {}..={} is empty",
                self.bus_start, self.bus_end
            ));
        }
        if !self.ecam_base.is_multiple_of(1 << 20) {
            return bad(format!(
                "ECAM base {:#x} is not 1 MiB aligned",
                self.ecam_base
            ));
        }
        let ecam_span = (u64::from(self.bus_end) + 1) << 20;
        if self.ecam_base.checked_add(ecam_span).is_none() {
            return bad("ECAM window overflows the address space".into());
        }
        let (ecam_start, ecam_end) = self.ecam_range();
        let (io_base, io_last) = self.io_window;
        if io_base > io_last {
            return bad(format!("I/O window {io_base:#x}..={io_last:#x} is empty"));
        }
        if io_base < SECOND_IO_WINDOW_MIN {
            return bad(format!(
                "I/O window {io_base:#x}..={io_last:#x} must start at or above {SECOND_IO_WINDOW_MIN:#x} \
                 (legacy ports and the PCI configuration ports 0xcf8..=0xcff are below)"
            ));
        }
        let (m32_base, m32_size) = self.mmio32;
        if m32_size == 0
            || m32_base
                .checked_add(m32_size)
                .is_none_or(|end| end > 1 << 32)
        {
            return bad(format!(
                "32-bit MMIO window {m32_base:#x}+{m32_size:#x} must be non-empty and end at or below 4 GiB"
            ));
        }
        let (m64_base, m64_size) = self.mmio64;
        if m64_size != 0 && m64_base.checked_add(m64_size).is_none() {
            return bad(format!(
                "64-bit MMIO window {m64_base:#x}+{m64_size:#x} overflows"
            ));
        }
        let overlaps = |(b, s): (u64, u64)| s != 0 && b < ecam_end && ecam_start < b + s;
        if overlaps(self.mmio32) || overlaps(self.mmio64) {
            return bad(format!(
                "ECAM window {ecam_start:#x}..{ecam_end:#x} overlaps an MMIO window"
            ));
        }
        if m64_size != 0 && m32_base < m64_base + m64_size && m64_base < m32_base + m32_size {
            return bad("the 32-bit and 64-bit MMIO windows overlap".into());
        }
        Ok(())
    }
}

/// The `\_SB.PCI0` host bridge device (to be placed in the `\_SB` scope), with
/// extra child objects such as root ports and ACPI hotplug slots.
pub struct HostBridge<'a> {
    cfg: &'a HostBridgeConfig,
    children: Vec<&'a dyn Aml>,
}

impl<'a> HostBridge<'a> {
    /// A host bridge described by `cfg` (which must have passed
    /// [`HostBridgeConfig::validate`]) containing `children`, which are
    /// appended after the bridge's own objects.
    pub fn new(cfg: &'a HostBridgeConfig, children: Vec<&'a dyn Aml>) -> Self {
        HostBridge { cfg, children }
    }
}

/// `Name (_CRS, ResourceTemplate () {...})` of the host bridge: the bus range,
/// the two I/O windows around the configuration ports and the MMIO windows.
struct HostBridgeCrs<'a>(&'a HostBridgeConfig);

impl Aml for HostBridgeCrs<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let cfg = self.0;
        let bus = AddressSpace::<u16>::new_bus_number(cfg.bus_start.into(), cfg.bus_end.into());
        let io_low = AddressSpace::<u16>::new_io(FIRST_IO_WINDOW.0, FIRST_IO_WINDOW.1, None);
        let io_high = AddressSpace::<u16>::new_io(cfg.io_window.0, cfg.io_window.1, None);
        let (m32_base, m32_size) = cfg.mmio32;
        let mmio32 = AddressSpace::<u32>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            m32_base as u32,
            (m32_base + m32_size - 1) as u32,
            None,
        );
        let (m64_base, m64_size) = cfg.mmio64;
        let mmio64 = AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::Cacheable,
            true,
            m64_base,
            m64_base.wrapping_add(m64_size).wrapping_sub(1),
            None,
        );
        let mut resources: Vec<&dyn Aml> = vec![&bus, &io_low, &io_high, &mmio32];
        if m64_size != 0 {
            resources.push(&mmio64);
        }
        Name::new("_CRS".into(), &ResourceTemplate::new(resources)).to_aml_bytes(sink);
    }
}

/// `Name (_PRT, Package () {...})`: INTA..INTD of every device slot routed
/// straight to I/O APIC GSIs 16..19 (no interrupt link devices).
///
/// Note: ACPI defines link-less `_PRT` entries as level-triggered,
/// active-low, and Linux programs the I/O APIC that way.
struct Prt;

impl Aml for Prt {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut entries = aml::PackageBuilder::new();
        for slot in 0u32..32 {
            for pin in 0u32..4 {
                let address = (slot << 16) | 0xFFFF;
                let gsi = PRT_GSI_BASE + (slot + pin) % 4;
                entries.add_element(&Package::new(vec![
                    &address,
                    &(pin as u8),
                    &aml::ZERO,
                    &gsi,
                ]));
            }
        }
        Name::new("_PRT".into(), &entries).to_aml_bytes(sink);
    }
}

/// The `_OSC` method (see the module documentation).
struct Osc<'a>(&'a OscConfig);

impl Aml for Osc<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let cdw1 = Path::new("CDW1");
        let cdw2 = Path::new("CDW2");
        let cdw3 = Path::new("CDW3");
        let supp = Path::new("SUPP");
        let ctrl = Path::new("CTRL");
        let osta = Path::new("OSTA");
        let osup = Path::new("OSUP");
        let oreq = Path::new("OREQ");
        let ognt = Path::new("OGNT");
        let requested = Local(0);
        let granted = Local(1);
        let allowed = self.0.allowed_control();

        let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &0u8);
        let create_cdw2 = CreateDWordField::new(&cdw2, &Arg(3), &4u8);
        let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);

        // Fewer than 3 dwords: there is no control field to work on.
        let failure_bit = OSC_CDW1_FAILURE as u8;
        let set_failure = Or::new(&cdw1, &cdw1, &failure_bit);
        let ret = Return::new(&Arg(3));
        let too_short = LessThan::new(&Arg(2), &3u8);
        let if_too_short = If::new(&too_short, vec![&set_failure, &ret]);

        let save_support = Store::new(&supp, &cdw2);
        let load_requested = Store::new(&requested, &cdw3);

        let bad_rev_bit = OSC_CDW1_UNRECOGNIZED_REVISION as u8;
        let set_bad_rev = Or::new(&cdw1, &cdw1, &bad_rev_bit);
        let grant_nothing = Store::new(&granted, &aml::ZERO);
        let unknown_rev = NotEqual::new(&Arg(1), &aml::ONE);
        let if_unknown_rev = If::new(&unknown_rev, vec![&set_bad_rev, &grant_nothing]);
        let mask = And::new(&granted, &requested, &allowed);
        let else_known_rev = Else::new(vec![&mask]);

        let report_status = Store::new(&osta, &cdw1);
        let report_support = Store::new(&osup, &supp);
        let report_requested = Store::new(&oreq, &requested);
        let report_granted = Store::new(&ognt, &granted);

        let masked_bit = OSC_CDW1_CAPABILITIES_MASKED as u8;
        let set_masked = Or::new(&cdw1, &cdw1, &masked_bit);
        let was_masked = NotEqual::new(&granted, &requested);
        let if_masked = If::new(&was_masked, vec![&set_masked]);
        let store_granted = Store::new(&cdw3, &granted);
        let save_control = Store::new(&ctrl, &granted);

        let mut pci_body: Vec<&dyn Aml> = Vec::new();
        if self.0.report_port.is_some() {
            // CDW1 as the OS passed it, before this method sets any of its bits.
            pci_body.push(&report_status);
        }
        pci_body.extend_from_slice(&[
            &if_too_short,
            &create_cdw2,
            &create_cdw3,
            &save_support,
            &load_requested,
            &if_unknown_rev,
            &else_known_rev,
        ]);
        if self.0.report_port.is_some() {
            pci_body.push(&report_support);
            pci_body.push(&report_requested);
            pci_body.push(&report_granted);
        }
        pci_body.extend_from_slice(&[&if_masked, &store_granted, &save_control]);

        let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
        let is_pci = Equal::new(&Arg(0), &uuid);
        let if_pci = If::new(&is_pci, pci_body);
        let bad_uuid_bit = OSC_CDW1_UNRECOGNIZED_UUID as u8;
        let set_bad_uuid = Or::new(&cdw1, &cdw1, &bad_uuid_bit);
        let else_other = Else::new(vec![&set_bad_uuid]);

        Method::new(
            "_OSC".into(),
            4,
            true,
            vec![&create_cdw1, &if_pci, &else_other, &ret],
        )
        .to_aml_bytes(sink);
    }
}

impl Aml for HostBridge<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let cfg = self.cfg;
        let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
        let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
        let seg = Name::new("_SEG".into(), &cfg.segment);
        let uid = Name::new("_UID".into(), &aml::ZERO);
        let bbn = Name::new("_BBN".into(), &cfg.bus_start);
        // Last _OSC support field from the OS and control granted to it.
        let supp = Name::new("SUPP".into(), &aml::ZERO);
        let ctrl = Name::new("CTRL".into(), &aml::ZERO);
        let report_port = cfg.osc.report_port.unwrap_or(0);
        let report_region = OpRegion::new(
            "OSCR".into(),
            OpRegionSpace::SystemIO,
            &report_port,
            &OSC_REPORT_LEN,
        );
        let report_fields = aml::Field::new(
            "OSCR".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::Preserve,
            vec![
                FieldEntry::Named(*b"OSTA", 32),
                FieldEntry::Named(*b"OSUP", 32),
                FieldEntry::Named(*b"OREQ", 32),
                FieldEntry::Named(*b"OGNT", 32),
            ],
        );
        let osc = Osc(&cfg.osc);
        let crs = HostBridgeCrs(cfg);

        let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &uid, &bbn, &supp, &ctrl];
        if cfg.osc.report_port.is_some() {
            children.push(&report_region);
            children.push(&report_fields);
        }
        children.extend_from_slice(&[&osc, &crs, &Prt]);
        children.extend_from_slice(&self.children);
        Device::new("PCI0".into(), children).to_aml_bytes(sink);
    }
}
