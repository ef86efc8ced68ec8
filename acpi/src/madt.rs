//! The Multiple APIC Description Table (signature `APIC`): one enabled local
//! APIC per vCPU, the I/O APIC serving GSIs from 0, and the usual ISA
//! interrupt source override IRQ0 -> GSI2.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use crate::{MachineConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// MADT revision (ACPI 6.3 and later: 5, which lets the OS honour the
/// "online capable" local APIC flag if CPU hotplug is added later).
pub const MADT_REVISION: u8 = 5;

/// MADT interrupt source override flag: polarity active high.
pub const MPS_INTI_POLARITY_ACTIVE_HIGH: u16 = 0b01;
/// MADT interrupt source override flag: polarity active low.
pub const MPS_INTI_POLARITY_ACTIVE_LOW: u16 = 0b11;
/// MADT interrupt source override flag: edge-triggered.
pub const MPS_INTI_TRIGGER_EDGE: u16 = 0b01 << 2;
/// MADT interrupt source override flag: level-triggered.
pub const MPS_INTI_TRIGGER_LEVEL: u16 = 0b11 << 2;

/// MADT Interrupt Source Override structure (type 2, 10 bytes), which
/// acpi_tables 0.2.1 does not provide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptSourceOverride {
    /// ISA IRQ.
    pub source: u8,
    /// Global system interrupt it is delivered on.
    pub gsi: u32,
    /// MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3.
    pub flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(2); // type
        sink.byte(10); // length
        sink.byte(0); // bus: ISA
        sink.byte(self.source);
        sink.dword(self.gsi);
        sink.word(self.flags);
    }
}

/// Builds the MADT for `cfg`.
pub fn build_madt(cfg: &MachineConfig) -> Vec<u8> {
    // Header, local interrupt controller address, flags (PCAT_COMPAT clear:
    // there are no 8259s).
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, cfg.lapic_addr);
    madt.write_u32(40, 0);

    let mut structures: Vec<Box<dyn Aml>> = Vec::new();
    for cpu in 0..cfg.cpus {
        structures.push(Box::new(ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    structures.push(Box::new(IoApic::new(cfg.ioapic_id, cfg.ioapic_addr, 0)));
    structures.push(Box::new(InterruptSourceOverride {
        source: 0,
        gsi: 2,
        flags: MPS_INTI_POLARITY_ACTIVE_HIGH | MPS_INTI_TRIGGER_EDGE,
    }));
    for structure in &structures {
        madt.append_slice(&crate::to_bytes(structure.as_ref()));
    }
    madt.as_slice().to_vec()
}

/// The APIC IDs of the enabled local APIC structures in a MADT blob, in
/// table order.
pub fn local_apic_ids(madt: &[u8]) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut off = 44;
    while off + 2 <= madt.len() {
        let (ty, len) = (madt[off], usize::from(madt[off + 1]));
        if len < 2 || off + len > madt.len() {
            break;
        }
        if ty == 0 && len == 8 && madt[off + 4] & 1 != 0 {
            ids.push(madt[off + 3]);
        }
        off += len;
    }
    ids
}
