//! The `_OSC` report registers: sixteen consecutive I/O ports, four 32-bit registers, into which
//! every evaluation of the host bridge's `_OSC` (PCI Firmware Specification 3.3 §4.5) writes, in
//! this order, CDW1 as the OS passed it, the support dword, the control dword the OS requested
//! and the control dword granted (that last write completes an evaluation). Only aligned 32-bit
//! accesses are decoded.
//!
//! | offset | name | meaning |
//! | --- | --- | --- |
//! | 0x0 | [`REG_STATUS`] | CDW1 as the OS passed it |
//! | 0x4 | [`REG_SUPPORT`] | CDW2: the features the OS supports |
//! | 0x8 | [`REG_REQUESTED`] | CDW3 on entry: the control the OS requested |
//! | 0xC | [`REG_GRANTED`] | CDW3 on return: the control granted |
//!
//! The dword bits below are the PCI Firmware Specification's (§4.5.1), named as Linux names
//! them where it prints them.

/// Offset of the status register (CDW1 on entry).
pub const REG_STATUS: u16 = 0x0;
/// Offset of the support register (CDW2).
pub const REG_SUPPORT: u16 = 0x4;
/// Offset of the requested-control register (CDW3 on entry).
pub const REG_REQUESTED: u16 = 0x8;
/// Offset of the granted-control register (CDW3 on return).
pub const REG_GRANTED: u16 = 0xC;
/// Number of I/O ports of the register block.
pub const OSC_REPORT_PORTS: u16 = 0x10;

/// CDW1 bit: query only, do not latch the result.
pub const CDW1_QUERY: u32 = 1 << 0;
/// CDW1 bit: `_OSC` failure.
pub const CDW1_FAILURE: u32 = 1 << 1;
/// CDW1 bit: unrecognized UUID.
pub const CDW1_UNRECOGNIZED_UUID: u32 = 1 << 2;
/// CDW1 bit: unrecognized revision.
pub const CDW1_UNRECOGNIZED_REVISION: u32 = 1 << 3;
/// CDW1 bit: capabilities masked (some requested control was not granted).
pub const CDW1_CAPABILITIES_MASKED: u32 = 1 << 4;

/// Control field bit: PCI Express native hot plug.
pub const CTRL_PCIE_NATIVE_HP: u32 = 1 << 0;
/// Control field bit: SHPC native hot plug.
pub const CTRL_SHPC_NATIVE_HP: u32 = 1 << 1;
/// Control field bit: PCI Express native power management events.
pub const CTRL_PCIE_PME: u32 = 1 << 2;
/// Control field bit: PCI Express Advanced Error Reporting.
pub const CTRL_PCIE_AER: u32 = 1 << 3;
/// Control field bit: PCI Express capability structure.
pub const CTRL_PCIE_CAPABILITY: u32 = 1 << 4;
/// Control field bit: Latency Tolerance Reporting.
pub const CTRL_LTR: u32 = 1 << 5;
/// Control field bit: Downstream Port Containment (with EDR).
pub const CTRL_DPC: u32 = 1 << 7;

/// Control field bits, as Linux names them.
pub const CONTROL_NAMES: [(u32, &str); 7] = [
    (CTRL_PCIE_NATIVE_HP, "PCIeHotplug"),
    (CTRL_SHPC_NATIVE_HP, "SHPCHotplug"),
    (CTRL_PCIE_PME, "PME"),
    (CTRL_PCIE_AER, "AER"),
    (CTRL_PCIE_CAPABILITY, "PCIeCapability"),
    (CTRL_LTR, "LTR"),
    (CTRL_DPC, "DPC"),
];

/// Support field bits, as Linux names them.
pub const SUPPORT_NAMES: [(u32, &str); 8] = [
    (1 << 0, "ExtendedConfig"),
    (1 << 1, "ASPM"),
    (1 << 2, "ClockPM"),
    (1 << 3, "Segments"),
    (1 << 4, "MSI"),
    (1 << 5, "HPX-Type3"),
    (1 << 6, "EDR"),
    (1 << 8, "HotplugEventSupport"),
];
