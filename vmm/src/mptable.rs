//! The Intel MultiProcessor Specification table (MP spec 1.4, chapter 4): a floating pointer
//! and a configuration table at the top of base memory.
//!
//! Linux prefers ACPI's MADT and ignores this table when the MADT describes both the local
//! APICs and the I/O APIC, as ours does. It is here for boot time: before ACPI, Linux looks for
//! the floating pointer in the first KiB of memory, then in the last KiB of base memory, then in
//! the 64 KiB BIOS area 0xF0000-0xFFFFF, 16 bytes at a time, mapping and unmapping a fixmap for
//! each step (`arch/x86/kernel/mpparse.c`, `smp_scan_config`). On PVM hosts that scan of the BIOS
//! area runs in KVM's instruction emulator and costs about 2.8 s; a floating pointer at the start
//! of the last KiB of base memory ends it at its first step. The table is complete (processors,
//! ISA bus, I/O APIC, ISA interrupts, local interrupts) so that a guest booted with `acpi=off`
//! finds its CPUs and interrupts here.

/// "_MP_": the floating pointer's signature (MP spec 1.4 §4.1).
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// "PCMP": the configuration table header's signature (MP spec 1.4 §4.2).
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// Specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Floating pointer length in 16-byte paragraphs.
const MPF_LENGTH_PARAGRAPHS: u8 = 1;
/// Floating pointer size in bytes.
const MPF_SIZE: usize = 16;
/// Configuration table header size in bytes.
const MPC_HEADER_SIZE: usize = 44;

/// Entry types (MP spec 1.4 §4.3, table 4-3) and their sizes.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const OTHER_ENTRY_SIZE: usize = 8;

/// Processor entry flags (§4.3.1): enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Local APIC version: integrated APIC (0x1x).
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature (family 6) and CPUID.1:EDX feature flags FPU and APIC, for the processor entry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// I/O APIC entry flag (§4.3.3): usable.
const IOAPIC_USABLE: u8 = 1;
/// I/O APIC version (82093AA-style, as KVM's in-kernel I/O APIC reports).
const IOAPIC_VERSION: u8 = 0x11;
/// Interrupt types (§4.3.4, table 4-9).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: conforming polarity and trigger (the bus's: edge, active high on ISA).
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination "all local APICs" for local interrupt entries.
const ALL_LOCAL_APICS: u8 = 0xff;
/// The one bus: ISA, id 0.
const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";
/// ISA IRQs described to the I/O APIC.
const ISA_IRQS: u8 = 16;

/// Where the machine's interrupt controllers are, for [`build`].
#[derive(Clone, Copy, Debug)]
pub struct MpConfig {
    /// vCPUs, local APIC ids 0..cpus.
    pub cpus: u8,
    /// The I/O APIC's id and MMIO address.
    pub ioapic_id: u8,
    pub ioapic_addr: u32,
    /// The local APICs' MMIO address.
    pub lapic_addr: u32,
}

/// Builds the floating pointer and, right after it, the configuration table, for placing at
/// guest-physical `base` (16-byte aligned, below 4 GiB).
pub fn build(cfg: &MpConfig, base: u32) -> Vec<u8> {
    let table_addr = base + MPF_SIZE as u32;

    // Processors, then the bus, the I/O APIC, 15 ISA interrupts and 2 local interrupts.
    let others = 1 + 1 + usize::from(ISA_IRQS - 1) + 2;
    let mut entries = Vec::with_capacity(
        PROCESSOR_ENTRY_SIZE * usize::from(cfg.cpus) + OTHER_ENTRY_SIZE * others,
    );
    let mut count: u16 = 0;
    for cpu in 0..cfg.cpus {
        let mut flags = CPU_ENABLED;
        if cpu == 0 {
            flags |= CPU_BOOTSTRAP;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(ISA_BUS_TYPE);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, cfg.ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    count += 1;
    // ISA IRQ n on I/O APIC pin n, except the timer's IRQ 0 on pin 2 (the MADT's override).
    // IRQ 2 is the cascade and has no entry.
    for irq in (0..ISA_IRQS).filter(|&irq| irq != 2) {
        let pin = if irq == 0 { 2 } else { irq };
        io_interrupt(&mut entries, irq, cfg.ioapic_id, pin);
        count += 1;
    }
    // LINT0: ExtINT (virtual wire), LINT1: NMI, on every local APIC.
    for (lint, kind) in [(0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    let mut table = Vec::with_capacity(MPC_HEADER_SIZE + entries.len());
    table.extend_from_slice(MPC_SIGNATURE);
    let length = u16::try_from(MPC_HEADER_SIZE + entries.len()).expect("64 vCPUs fit");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"HOTPLUG "); // OEM id, 8 bytes
    table.extend_from_slice(b"HOTPLUG-VMM "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&cfg.lapic_addr.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), MPC_HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE + table.len());
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(MPF_LENGTH_PARAGRAPHS);
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.push(0); // feature 1: a configuration table is present
    mpf.push(0); // feature 2: virtual wire mode, no IMCR
    mpf.extend_from_slice(&[0; 3]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

/// An I/O interrupt entry (§4.3.4): ISA `irq` arrives on `pin` of the I/O APIC.
fn io_interrupt(entries: &mut Vec<u8>, irq: u8, ioapic_id: u8, pin: u8) {
    entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
    entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
    entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cpus: u8) -> MpConfig {
        MpConfig {
            cpus,
            ioapic_id: cpus,
            ioapic_addr: 0xfec0_0000,
            lapic_addr: 0xfee0_0000,
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
    }

    /// What Linux's `smp_scan_config` and `smp_check_mpc` check, and the entries in order.
    #[test]
    fn floating_pointer_and_table_pass_linux_checks() {
        let base = 0x9fc00u32;
        let blob = build(&cfg(2), base);
        let mpf = &blob[..MPF_SIZE];
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(mpf[8], 1, "length in paragraphs");
        assert_eq!(mpf[9], 4, "spec 1.4");
        assert_eq!(sum(mpf), 0);
        assert_eq!(mpf[11], 0, "not a default configuration");
        let physptr = u32::from_le_bytes(mpf[4..8].try_into().unwrap());
        assert_eq!(physptr, base + 16);

        let table = &blob[MPF_SIZE..];
        assert_eq!(&table[0..4], b"PCMP");
        let length = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(length, table.len());
        assert_eq!(table[6], 4);
        assert_eq!(sum(table), 0);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, the bus, the I/O APIC, 15 ISA IRQs, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 15 + 2);

        let mut at = MPC_HEADER_SIZE;
        let mut kinds = Vec::new();
        while at < length {
            kinds.push(table[at]);
            at += if table[at] == ENTRY_PROCESSOR {
                PROCESSOR_ENTRY_SIZE
            } else {
                OTHER_ENTRY_SIZE
            };
        }
        assert_eq!(at, length, "entries end exactly at the table's length");
        assert_eq!(kinds.len(), count as usize);
        assert_eq!(&kinds[..4], &[0, 0, 1, 2]);
        // The boot processor is flagged, the second is not.
        assert_eq!(table[MPC_HEADER_SIZE + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(table[MPC_HEADER_SIZE + 20 + 3], CPU_ENABLED);
        // IRQ 0 goes to pin 2, like the MADT's override.
        let first_irq = MPC_HEADER_SIZE + 2 * PROCESSOR_ENTRY_SIZE + 2 * OTHER_ENTRY_SIZE;
        assert_eq!(&table[first_irq..first_irq + 8], &[3, 0, 0, 0, 0, 0, 2, 2]);
    }

    #[test]
    fn the_largest_machine_fits_below_the_acpi_tables() {
        let blob = build(&cfg(64), 0x9fc00);
        assert!(0x9fc00 + blob.len() < crate::layout::ACPI_START as usize);
        assert_eq!(sum(&blob[MPF_SIZE..]), 0);
    }
}
