//! The Fixed ACPI Description Table (signature `FACP`).
//!
//! The machine is a hardware-reduced ACPI platform (ACPI 6.x §4.1): there is
//! no PM1 event/control block, no GPE block, no PM timer and no FACS. In
//! their place:
//!
//! * the sleep control register ([`crate::MachineConfig::sleep_control_port`],
//!   8-bit SystemIO): Linux powers off by writing
//!   `(SLP_TYP_S5 << SLEEP_CONTROL_SLP_TYP_SHIFT) | SLEEP_CONTROL_SLP_EN`
//!   (that is `0x34`) to it, `SLP_TYP_S5` coming from the DSDT's `\_S5`;
//! * the sleep status register ([`crate::MachineConfig::sleep_status_port`],
//!   8-bit SystemIO): bit 7 is WAK_STS; Linux writes it with 1 before sleeping
//!   and polls it to detect wake-up (never, for S5);
//! * the reset register ([`crate::MachineConfig::reset_port`], 8-bit
//!   SystemIO, `RESET_REG_SUP` set): Linux writes
//!   [`crate::MachineConfig::reset_value`] there to reboot.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::Aml;

use crate::{MachineConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Length of the FADT (ACPI 6.5 layout, including the hypervisor vendor
/// identity).
pub const FADT_LEN: usize = 276;

/// Sleep type value for S5 (soft off): the first element of the DSDT's
/// `\_S5` package, written by the guest into the SLP_TYP field of the sleep
/// control register. The VMM powers the machine off when it sees this type
/// with [`SLEEP_CONTROL_SLP_EN`].
pub const SLP_TYP_S5: u8 = 5;
/// Position of the 3-bit SLP_TYP field in the sleep control register.
pub const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
/// Mask of the SLP_TYP field in the sleep control register.
pub const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0x7 << SLEEP_CONTROL_SLP_TYP_SHIFT;
/// SLP_EN bit of the sleep control register: enter the sleep state.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// WAK_STS bit of the sleep status register.
pub const SLEEP_STATUS_WAK_STS: u8 = 1 << 7;

/// IA-PC boot architecture flag: legacy devices (LPC/ISA) present.
pub const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: 8042 keyboard controller present.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: VGA not present.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: MSI not supported.
pub const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// IA-PC boot architecture flag: OS must not enable PCIe ASPM.
pub const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// IA-PC boot architecture flag: CMOS RTC not present.
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// The IA-PC boot architecture flags of the machine: no VGA, no CMOS RTC;
/// no 8042, MSI supported, ASPM left to the OS.
pub const IAPC_BOOT_ARCH: u16 =
    IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;

fn io_register_8bit(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the FADT for `cfg`, pointing at the DSDT at `dsdt_addr` through
/// both X_DSDT and (when it fits) the 32-bit DSDT field.
pub fn build_fadt(cfg: &MachineConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::Wbinvd)
        // No fixed-feature power/sleep buttons (there are no fixed features).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::HwReducedAcpi);
    if let Ok(dsdt32) = u32::try_from(dsdt_addr) {
        // Same value in both fields: ACPICA only warns when they differ.
        fadt.dsdt = dsdt32.into();
    }
    fadt.sci_int = cfg.sci_irq.into();
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_register_8bit(cfg.reset_port);
    fadt.reset_value = cfg.reset_value;
    fadt.sleep_control_reg = io_register_8bit(cfg.sleep_control_port);
    fadt.sleep_status_reg = io_register_8bit(cfg.sleep_status_port);

    let fadt: FADT = fadt.finalize();
    let mut bytes = Vec::with_capacity(FADT_LEN);
    fadt.to_aml_bytes(&mut bytes);
    debug_assert_eq!(bytes.len(), FADT_LEN);
    bytes
}
