//! ACPI tables for hotplug-vmm guests.
//!
//! This crate builds the RSDP, XSDT, FADT, MADT, MCFG and DSDT a Linux guest
//! needs on an x86_64 machine with a PCIe host bridge, on top of the rust-vmm
//! [`acpi_tables`] crate (re-exported here so that users build extra AML with
//! the very same version). It has no KVM dependency: [`build_tables`] returns
//! byte blobs together with the guest-physical address each one must be
//! written at.
//!
//! The machine it describes is a *hardware-reduced* ACPI platform (no PM1
//! block, GPE block or PM timer): power-off goes through the FADT sleep
//! control register (see [`fadt::SLP_TYP_S5`]), reset through the FADT reset
//! register, and PCIe hotplug is negotiated with the guest through the host
//! bridge's `_OSC` (see [`host_bridge`]).
//!
//! Later work adds root ports, ACPI hotplug slots and a Generic Event Device
//! to the DSDT through [`DsdtExtras`] and [`build_tables_with`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod dsdt;
pub mod fadt;
pub mod host_bridge;
pub mod madt;
pub mod mcfg;
pub mod pci_hotplug;

pub use acpi_tables;
use acpi_tables::{rsdp::Rsdp, xsdt::XSDT, Aml};
pub use dsdt::DsdtExtras;
pub use host_bridge::{HostBridgeConfig, OscConfig};
pub use pci_hotplug::{AcpiHotplugBus, AcpiSlot, PciHotplugConfig, SlotParent};

/// OEM ID written into every table header.
pub const OEM_ID: [u8; 6] = *b"HPVMM ";
/// OEM table ID written into every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"HPVMMTBL";
/// OEM revision written into every table header.
pub const OEM_REVISION: u32 = 1;

/// Size of the guest-physical window the tables are laid out in, starting at
/// the `base` given to [`build_tables`]. With the conventional base
/// `0x000E_0000` the tables end below 1 MiB.
pub const TABLES_MAX_SIZE: u64 = 0x2_0000;

/// Alignment of every table after the RSDP.
pub const TABLE_ALIGN: u64 = 16;

/// The guest-physical base the VMM uses for the tables: the RSDP lands in the
/// BIOS read-only area that Linux scans when it gets no RSDP pointer from a
/// boot protocol.
pub const DEFAULT_TABLES_BASE: u64 = 0x000E_0000;

/// Errors from building the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A field of [`MachineConfig`] is inconsistent or out of range.
    #[error("invalid ACPI machine configuration: {0}")]
    InvalidConfig(String),
    /// The base address is not 16-byte aligned (the RSDP must be).
    #[error("ACPI tables base {0:#x} is not 16-byte aligned")]
    MisalignedBase(u64),
    /// The tables do not fit into [`TABLES_MAX_SIZE`] bytes after the base.
    #[error("ACPI tables need {size:#x} bytes, more than the {max:#x} available")]
    TooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        max: u64,
    },
}

/// Description of the machine the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs; their local APIC IDs and ACPI processor UIDs are
    /// `0..cpus`.
    pub cpus: u8,
    /// Local APIC physical address (normally `0xFEE0_0000`).
    pub lapic_addr: u32,
    /// I/O APIC physical address (normally `0xFEC0_0000`).
    pub ioapic_addr: u32,
    /// I/O APIC ID; the I/O APIC serves GSIs from 0.
    pub ioapic_id: u8,
    /// SCI interrupt written into the FADT (normally 9). A hardware-reduced
    /// platform has no SCI users in Linux, but the field is filled in anyway.
    pub sci_irq: u16,
    /// Hardware-reduced ACPI sleep control register: an 8-bit SystemIO port.
    /// The guest writes `(SLP_TYP << 2) | SLP_EN (0x20)` there to enter a
    /// sleep state; `SLP_TYP` [`fadt::SLP_TYP_S5`] means power off.
    pub sleep_control_port: u16,
    /// Hardware-reduced ACPI sleep status register: an 8-bit SystemIO port
    /// (bit 7 is WAK_STS, which the guest clears by writing 1 before sleeping).
    pub sleep_status_port: u16,
    /// FADT reset register: an 8-bit SystemIO port.
    pub reset_port: u16,
    /// Value the guest writes to [`MachineConfig::reset_port`] to reset.
    pub reset_value: u8,
    /// A 16550 UART to describe as `\_SB.COM1` (`PNP0501`): its base port and its interrupt
    /// (GSI, edge-triggered, active high). On a hardware-reduced platform Linux sets up no
    /// legacy ISA interrupts, so a UART the DSDT does not describe gets no IRQ: the kernel
    /// console still works (it polls), but opening the tty fails and user space has no console.
    pub serial: Option<(u16, u32)>,
    /// The PCIe host bridge.
    pub pci: HostBridgeConfig,
    /// ACPI PCI hot-plug: slot devices under the host bridge, the register block they use and
    /// the Generic Event Device that tells the guest about hot-plug events.
    pub pci_hotplug: Option<PciHotplugConfig>,
}

impl Default for MachineConfig {
    /// One vCPU, the standard APIC addresses, SCI 9, the sleep control,
    /// sleep status and reset registers at ports 0x600, 0x601 and 0x602
    /// (reset value 1), the default [`HostBridgeConfig`] and no ACPI PCI
    /// hot-plug.
    fn default() -> Self {
        MachineConfig {
            cpus: 1,
            lapic_addr: 0xFEE0_0000,
            ioapic_addr: 0xFEC0_0000,
            ioapic_id: 0,
            sci_irq: 9,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x01,
            serial: Some((0x3f8, 4)),
            pci: HostBridgeConfig::default(),
            pci_hotplug: None,
        }
    }
}

/// I/O port ranges ACPICA refuses to let AML or FADT register accesses touch
/// (`acpi_protected_ports` in ACPICA's hwvalid.c), plus the PCI configuration
/// mechanism #1 ports. Platform registers must stay out of them.
const PROTECTED_PORTS: &[(&str, u16, u16)] = &[
    ("DMA", 0x0000, 0x000F),
    ("PIC0", 0x0020, 0x0021),
    ("PIT1", 0x0040, 0x0043),
    ("PIT2", 0x0048, 0x004B),
    ("RTC", 0x0070, 0x0071),
    ("CMOS", 0x0074, 0x0076),
    ("DMA1", 0x0081, 0x0083),
    ("DMA1L", 0x0087, 0x0087),
    ("DMA2", 0x0089, 0x008B),
    ("DMA2L", 0x008F, 0x008F),
    ("ARBC", 0x0090, 0x0091),
    ("SETUP", 0x0093, 0x0094),
    ("POS", 0x0096, 0x0097),
    ("PIC1", 0x00A0, 0x00A1),
    ("IDMA", 0x00C0, 0x00DF),
    ("ELCR", 0x04D0, 0x04D1),
    ("PCI config", 0x0CF8, 0x0CFF),
];

impl MachineConfig {
    /// The platform I/O port ranges the DSDT's motherboard-resources device
    /// reserves, as `(name, first port, length)`: sleep control, sleep
    /// status, reset and (if enabled) the `_OSC` report registers.
    pub fn platform_ports(&self) -> Vec<(&'static str, u16, u16)> {
        let mut ports = vec![
            ("sleep control", self.sleep_control_port, 1),
            ("sleep status", self.sleep_status_port, 1),
            ("reset", self.reset_port, 1),
        ];
        if let Some(p) = self.pci.osc.report_port {
            ports.push(("_OSC report", p, host_bridge::OSC_REPORT_LEN));
        }
        if let Some(hp) = &self.pci_hotplug {
            ports.push(("ACPI PCI hot-plug", hp.port, pci_hotplug::PCI_HOTPLUG_PORTS));
        }
        ports
    }

    /// Checks the configuration for values the tables cannot describe or that
    /// Linux would reject.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.cpus == 0 {
            return bad("at least one CPU is required".into());
        }
        if self.cpus == u8::MAX {
            return bad("local APIC ID 0xff is the broadcast ID; at most 255 CPUs".into());
        }
        for (name, port, len) in self.platform_ports() {
            let last = u32::from(port) + u32::from(len) - 1;
            if last > 0xFFFF {
                return bad(format!(
                    "{name} register {port:#x}+{len} exceeds the I/O space"
                ));
            }
            for &(pname, first, plast) in PROTECTED_PORTS {
                if u32::from(port) <= u32::from(plast) && last >= u32::from(first) {
                    return bad(format!(
                        "{name} register {port:#x}..={last:#x} overlaps the {pname} ports \
                         {first:#x}..={plast:#x}, which ACPICA does not let AML access"
                    ));
                }
            }
        }
        if let Some(hp) = &self.pci_hotplug {
            hp.validate()?;
        }
        self.pci.validate()
    }
}

/// Returns the name a table blob is conventionally stored under: its 4-byte
/// signature (`FACP`, `APIC`, `MCFG`, `DSDT`, ...), or `RSDP` for the RSDP
/// (whose signature is `"RSD PTR "`).
pub fn table_name(blob: &[u8]) -> String {
    if blob.starts_with(b"RSD PTR ") {
        return "RSDP".to_string();
    }
    String::from_utf8_lossy(&blob[..blob.len().min(4)]).into_owned()
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(addr: u64, align: u64) -> u64 {
    addr.div_ceil(align) * align
}

/// Builds every ACPI table for `cfg`.
///
/// Returns each table blob with the guest-physical address it must be
/// written at. The RSDP goes at `base` (the VMM uses [`DEFAULT_TABLES_BASE`],
/// `0x000E_0000`, so Linux also finds it by scanning the BIOS area); the XSDT,
/// FADT, MADT, MCFG and DSDT follow it in that order, each
/// [`TABLE_ALIGN`]-byte aligned, all below `base + TABLES_MAX_SIZE`.
pub fn build_tables(cfg: &MachineConfig, base: u64) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    build_tables_with(cfg, base, &DsdtExtras::default())
}

/// Like [`build_tables`], with extra AML objects (root ports, ACPI hotplug
/// slots, a Generic Event Device, ...) added to the DSDT.
pub fn build_tables_with(
    cfg: &MachineConfig,
    base: u64,
    extras: &DsdtExtras<'_>,
) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    cfg.validate()?;
    if !base.is_multiple_of(TABLE_ALIGN) {
        return Err(Error::MisalignedBase(base));
    }

    // Tables that do not refer to other tables first, to know their sizes.
    let dsdt = dsdt::build_dsdt(cfg, extras);
    let madt = madt::build_madt(cfg);
    let mcfg = mcfg::build_mcfg(cfg);

    let rsdp_addr = base;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64, TABLE_ALIGN);
    let xsdt_len = 36 + 8 * 3;
    let fadt_addr = align_up(xsdt_addr + xsdt_len, TABLE_ALIGN);
    let madt_addr = align_up(fadt_addr + fadt::FADT_LEN as u64, TABLE_ALIGN);
    let mcfg_addr = align_up(madt_addr + madt.len() as u64, TABLE_ALIGN);
    let dsdt_addr = align_up(mcfg_addr + mcfg.len() as u64, TABLE_ALIGN);
    let end = dsdt_addr + dsdt.len() as u64;
    if end - base > TABLES_MAX_SIZE {
        return Err(Error::TooLarge {
            size: end - base,
            max: TABLES_MAX_SIZE,
        });
    }

    let fadt = fadt::build_fadt(cfg, dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok(vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (mcfg_addr, mcfg),
        (dsdt_addr, dsdt),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn cfg(cpus: u8) -> MachineConfig {
        MachineConfig {
            cpus,
            pci: HostBridgeConfig {
                osc: OscConfig {
                    grant_native_hotplug: true,
                    report_port: Some(0x610),
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn find<'a>(tables: &'a [(u64, Vec<u8>)], name: &str) -> &'a (u64, Vec<u8>) {
        tables
            .iter()
            .find(|(_, t)| table_name(t) == name)
            .unwrap_or_else(|| panic!("no {name} table"))
    }

    /// Checks everything that must hold for any configuration.
    fn check_tables(c: &MachineConfig, base: u64) -> Vec<(u64, Vec<u8>)> {
        let tables = build_tables(c, base).unwrap();
        let names: Vec<String> = tables.iter().map(|(_, t)| table_name(t)).collect();
        assert_eq!(names, ["RSDP", "XSDT", "FACP", "APIC", "MCFG", "DSDT"]);

        // Layout: RSDP at base, the rest aligned, non-overlapping, in the window.
        assert_eq!(tables[0].0, base);
        let mut prev_end = base;
        for (addr, t) in &tables {
            assert!(
                *addr >= prev_end,
                "{} overlaps the previous table",
                table_name(t)
            );
            assert_eq!(addr % TABLE_ALIGN, 0, "{} misaligned", table_name(t));
            prev_end = addr + t.len() as u64;
        }
        assert!(prev_end <= base + TABLES_MAX_SIZE);

        // Checksums and lengths.
        let (_, rsdp) = &tables[0];
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        for (_, t) in &tables[1..] {
            assert_eq!(sum(t), 0, "{} checksum", table_name(t));
            assert_eq!(u32_at(t, 4) as usize, t.len(), "{} length", table_name(t));
        }

        // RSDP -> XSDT -> FADT, MADT, MCFG.
        let (xsdt_addr, xsdt) = &tables[1];
        assert_eq!(u64_at(rsdp, 24), *xsdt_addr);
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(
            entries,
            [
                find(&tables, "FACP").0,
                find(&tables, "APIC").0,
                find(&tables, "MCFG").0
            ]
        );

        // FADT -> DSDT.
        let (_, fadt) = find(&tables, "FACP");
        let dsdt_addr = find(&tables, "DSDT").0;
        assert_eq!(fadt.len(), fadt::FADT_LEN);
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_addr, "DSDT");
        tables
    }

    #[test]
    fn one_cpu() {
        let c = cfg(1);
        let tables = check_tables(&c, DEFAULT_TABLES_BASE);
        let (_, madt) = find(&tables, "APIC");
        assert_eq!(madt::local_apic_ids(madt), [0]);
    }

    #[test]
    fn eight_cpus() {
        let c = cfg(8);
        let tables = check_tables(&c, DEFAULT_TABLES_BASE);
        let (_, madt) = find(&tables, "APIC");
        assert_eq!(madt::local_apic_ids(madt), (0..8).collect::<Vec<u8>>());
    }

    #[test]
    fn other_base_and_max_cpus() {
        check_tables(&cfg(254), 0x10_0000);
    }

    #[test]
    fn madt_contents() {
        let c = cfg(2);
        let madt = madt::build_madt(&c);
        assert_eq!(u32_at(&madt, 36), c.lapic_addr);
        // Walk the structures.
        let mut off = 44;
        let mut lapics = 0;
        let mut ioapics = 0;
        let mut isos = Vec::new();
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(madt[off + 2], lapics, "processor UID");
                    assert_eq!(madt[off + 3], lapics, "APIC ID");
                    assert_eq!(u32_at(&madt, off + 4), 1, "enabled");
                    lapics += 1;
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(madt[off + 2], c.ioapic_id);
                    assert_eq!(u32_at(&madt, off + 4), c.ioapic_addr);
                    assert_eq!(u32_at(&madt, off + 8), 0, "GSI base");
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(len, 10);
                    isos.push((
                        madt[off + 3],
                        u32_at(&madt, off + 4),
                        u16_at(&madt, off + 8),
                    ));
                }
                t => panic!("unexpected MADT structure type {t}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, 2);
        assert_eq!(ioapics, 1);
        // IRQ0 -> GSI2, edge-triggered, active high.
        assert_eq!(isos, [(0, 2, 0x5)]);
    }

    #[test]
    fn mcfg_contents() {
        let mut c = cfg(1);
        c.pci.bus_start = 0;
        c.pci.bus_end = 0x3f;
        let mcfg = mcfg::build_mcfg(&c);
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(&mcfg[..4], b"MCFG");
        assert_eq!(u64_at(&mcfg, 44), 0xE000_0000);
        assert_eq!(u16_at(&mcfg, 52), 0, "segment");
        assert_eq!(mcfg[54], 0, "start bus");
        assert_eq!(mcfg[55], 0x3f, "end bus");
        assert_eq!(sum(&mcfg), 0);
    }

    #[test]
    fn fadt_contents() {
        let c = cfg(1);
        let fadt = fadt::build_fadt(&c, 0xE_1000);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt[131], 5, "FADT minor revision");
        assert_eq!(u16_at(&fadt, 46), 9, "SCI_INT");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let boot_arch = u16_at(&fadt, 109);
        assert_eq!(boot_arch, (1 << 2) | (1 << 5), "IAPC_BOOT_ARCH");
        // No PM1/GPE/PM timer blocks.
        for off in (56..=88).step_by(4) {
            assert_eq!(u32_at(&fadt, off), 0, "legacy block at {off}");
        }
        for off in (148..244).step_by(12) {
            assert_eq!(&fadt[off..off + 12], &[0; 12], "X_ block at {off}");
        }
        // Reset register: SystemIO, 8 bits, byte access.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), 0x602);
        assert_eq!(fadt[128], 1, "reset value");
        // Sleep control / status.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), 0x600);
        assert_eq!(&fadt[256..260], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 260), 0x601);
        // FACS: none on a hardware-reduced platform.
        assert_eq!(u32_at(&fadt, 36), 0);
        assert_eq!(u64_at(&fadt, 132), 0);
    }

    #[test]
    fn dsdt_mentions_what_linux_needs() {
        let c = cfg(1);
        let dsdt = dsdt::build_dsdt(&c, &DsdtExtras::default());
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(dsdt[8], 2, "DSDT revision 2 (64-bit integers)");
        for name in [
            b"PCI0", b"_OSC", b"_CRS", b"_PRT", b"_S5_", b"_SEG", b"_BBN", b"_UID", b"OREQ",
            b"OGNT",
        ] {
            assert!(has(name), "DSDT lacks {}", String::from_utf8_lossy(name));
        }
        // _S5 = Package(4) {5, 0, 0, 0}
        assert!(has(&[
            b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0A, 0x05, 0, 0, 0
        ]));
        // EisaId("PNP0A08"), EisaId("PNP0A03"), EisaId("PNP0C02").
        assert!(has(&[0x41, 0xD0, 0x0A, 0x08]));
        assert!(has(&[0x41, 0xD0, 0x0A, 0x03]));
        assert!(has(&[0x41, 0xD0, 0x0C, 0x02]));
        // The ECAM window is reserved: Memory32Fixed(ReadWrite, 0xE0000000, 0x10000000).
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend_from_slice(&0xE000_0000u32.to_le_bytes());
        ecam.extend_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(has(&ecam));
        // The PCI host bridge _OSC UUID.
        assert!(has(&[
            0x5B, 0x4D, 0xDB, 0x33, 0xF7, 0x1F, 0x1C, 0x40, 0x96, 0x57, 0x74, 0x41, 0xC0, 0x3D,
            0xD7, 0x66
        ]));
    }

    #[test]
    fn dsdt_without_report_port() {
        let mut c = cfg(1);
        c.pci.osc.report_port = None;
        let dsdt = dsdt::build_dsdt(&c, &DsdtExtras::default());
        assert!(!dsdt.windows(4).any(|w| w == b"OREQ"));
        assert_eq!(sum(&dsdt), 0);
    }

    #[test]
    fn extras_go_into_the_dsdt() {
        use acpi_tables::aml;
        let c = cfg(1);
        let adr = aml::Name::new("_ADR".into(), &0x0001_0000u32);
        let rp = aml::Device::new("RP00".into(), vec![&adr]);
        let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let ged = aml::Device::new("GED0".into(), vec![&ged_hid]);
        let extras = DsdtExtras {
            host_bridge: vec![&rp],
            system_bus: vec![&ged],
            root: vec![],
        };
        let tables = build_tables_with(&c, DEFAULT_TABLES_BASE, &extras).unwrap();
        let (_, dsdt) = find(&tables, "DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"RP00"));
        assert!(dsdt.windows(4).any(|w| w == b"GED0"));
        assert_eq!(sum(dsdt), 0);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let ok = cfg(1);
        assert!(ok.validate().is_ok());

        let mut c = ok.clone();
        c.cpus = 0;
        assert!(matches!(
            build_tables(&c, DEFAULT_TABLES_BASE),
            Err(Error::InvalidConfig(_))
        ));

        assert_eq!(
            build_tables(&ok, DEFAULT_TABLES_BASE + 8),
            Err(Error::MisalignedBase(DEFAULT_TABLES_BASE + 8))
        );

        let mut c = ok.clone();
        c.pci.bus_start = 10;
        c.pci.bus_end = 9;
        assert!(c.validate().is_err());

        let mut c = ok.clone();
        c.pci.io_window = (0x0C00, 0xFFFF);
        assert!(c.validate().is_err(), "I/O window over the config ports");

        let mut c = ok.clone();
        c.pci.mmio32 = (0xF000_0000, 0x2000_0000);
        assert!(c.validate().is_err(), "mmio32 above 4 GiB");

        let mut c = ok.clone();
        c.pci.mmio32 = (0xD000_0000, 0x2000_0000);
        assert!(c.validate().is_err(), "mmio32 over ECAM");

        let mut c = ok.clone();
        c.reset_port = 0xCF9;
        assert!(
            c.validate().is_err(),
            "reset register in the PCI config ports"
        );

        let mut c = ok.clone();
        c.pci.osc.report_port = Some(0xFFFC);
        assert!(c.validate().is_err(), "report registers past 0xFFFF");
    }

    #[test]
    fn too_large() {
        use acpi_tables::aml;
        let c = cfg(1);
        let big = aml::Name::new("BLOB".into(), &aml::BufferData::new(vec![0; 0x2_0000]));
        let extras = DsdtExtras {
            root: vec![&big],
            ..Default::default()
        };
        assert!(matches!(
            build_tables_with(&c, DEFAULT_TABLES_BASE, &extras),
            Err(Error::TooLarge { .. })
        ));
    }
}
