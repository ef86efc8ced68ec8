//! The guest-physical and port address map of the machine.
//!
//! ```text
//! 0x0000_0000 ..              RAM (boot structures in the first MiB, kernel at 1 MiB / 16 MiB)
//! 0x0009_FC00 .. 0x000A_0000  MP table (and more for many vCPUs), reserved in the E820 map
//! 0x000E_0000 .. 0x0010_0000  ACPI tables (RSDP first), reserved in the E820 map
//! ..           0xC000_0000    end of low RAM (RAM beyond 3 GiB continues at 4 GiB)
//! 0xC000_0000 .. 0xE000_0000  32-bit PCI MMIO window (BARs, bridge windows)
//! 0xE000_0000 .. 0xF000_0000  PCIe ECAM (MMCONFIG), 256 buses
//! 0xFEC0_0000                 IOAPIC
//! 0xFEE0_0000                 LAPIC
//! 4 GiB ..                    RAM above 4 GiB, then the 64-bit PCI MMIO window
//! ```

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, right after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xA000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xB000;
/// Initial stack pointer for the boot CPU (64-bit protocol).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of the conventional-memory RAM the E820 map reports below 1 MiB (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table: the start of the last KiB of base memory, the
/// second place Linux looks (`vmm/src/mptable.rs`).
pub const MPTABLE_START: u64 = EBDA_START;
/// ACPI tables: RSDP at the start of the BIOS read-only area, so the legacy scan finds it too.
pub const ACPI_START: u64 = 0xe0000;
/// End of the first MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// End of RAM below 4 GiB.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// 32-bit PCI MMIO window.
pub const MMIO32_START: u64 = 0xC000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM base (PCI Express Base Spec §7.2.2).
pub const ECAM_START: u64 = 0xE000_0000;
/// Buses decoded by the ECAM window.
pub const ECAM_BUSES: u16 = 256;
/// ECAM size: 1 MiB per bus.
pub const ECAM_SIZE: u64 = (ECAM_BUSES as u64) << 20;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// LAPIC MMIO base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Start of RAM above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI MMIO window, placed after the end of RAM.
pub const MMIO64_SIZE: u64 = 0x10_0000_0000;

/// KVM's TSS, three pages just below the IOAPIC-free top of the 32-bit space.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity map page for real-mode emulation, right before the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// COM1, the guest console.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// Hardware-reduced ACPI sleep control/status and reset registers.
pub const POWER_PORT: u16 = 0x600;
/// PCI configuration mechanism #1 (0xCF8 address, 0xCFC data).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports decoded by configuration mechanism #1.
pub const PCI_CONFIG_IO_SIZE: u16 = 8;
/// I/O window for PCI BARs and bridge windows.
pub const PCI_IO_WINDOW: (u16, u16) = (0x1000, 0xffff);
/// The ACPI SCI.
pub const SCI_IRQ: u16 = 9;
/// The `_OSC` report registers (16 ports): what the guest's `_OSC` asked for and got.
pub const OSC_REPORT_PORT: u16 = 0x610;
/// The ACPI PCI hot-plug controller's register block (24 ports, 0x620..0x637).
pub const ACPI_HOTPLUG_PORT: u16 = 0x620;
/// The Generic Event Device's interrupt (edge, active high): ACPI hot-plug events.
pub const GED_GSI: u32 = 5;

// The windows must not overlap; checked at compile time.
const _: () = {
    assert!(MMIO32_START + MMIO32_SIZE <= ECAM_START);
    assert!(ECAM_START + ECAM_SIZE <= IOAPIC_START);
    assert!(KVM_TSS_ADDRESS as u64 > ECAM_START + ECAM_SIZE);
    assert!(ACPI_START + 0x20000 <= HIGH_MEMORY_START);
};

/// Start of the 64-bit PCI MMIO window for a guest with `ram_size` bytes of RAM.
pub fn mmio64_start(ram_size: u64) -> u64 {
    let ram_end = if ram_size > LOW_RAM_END {
        HIGH_RAM_START + (ram_size - LOW_RAM_END)
    } else {
        HIGH_RAM_START
    };
    // 1 GiB aligned, so that large BARs can be naturally aligned inside.
    ram_end.next_multiple_of(1 << 30)
}

/// The RAM regions (start, size) of a guest with `ram_size` bytes.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    if ram_size <= LOW_RAM_END {
        vec![(0, ram_size)]
    } else {
        vec![(0, LOW_RAM_END), (HIGH_RAM_START, ram_size - LOW_RAM_END)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, LOW_RAM_END), (HIGH_RAM_START, (4 << 30) - LOW_RAM_END)]
        );
        assert_eq!(mmio64_start(512 << 20), 1 << 32);
        assert_eq!(mmio64_start(4 << 30), 5 << 30);
    }
}
