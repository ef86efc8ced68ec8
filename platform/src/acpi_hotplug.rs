//! The ACPI PCI hot-plug controller's register block: 24 consecutive I/O ports, six 32-bit
//! registers; bit `n` of the first five stands for device number `n` of the selected bus.
//! Only aligned 32-bit accesses are decoded (the AML declares its fields `DWordAcc`).
//!
//! | offset | name | access | meaning |
//! | --- | --- | --- | --- |
//! | 0x0 | [`REG_SELECT`] | RW | the bus the other registers refer to (its *bus select* value) |
//! | 0x4 | [`REG_INSERT`] | RW1C | slots with a device check pending (a device was inserted) |
//! | 0x8 | [`REG_REMOVE`] | RW1C | slots with an eject request pending |
//! | 0xC | [`REG_EJECT`] | WO, reads 0 | the guest ejects the slots whose bits it writes (`_EJ0`) |
//! | 0x10 | [`REG_BUS_CHECK`] | RW1C | slots whose device vanished (surprise removal) |
//! | 0x14 | [`REG_PENDING`] | RO | bit `b`: bus `b` (0..=31) has a bit set in its insert, remove or bus check register |
//!
//! Bus select values: 0 is the root bus ([`ROOT_BUS_SELECT`]), then one per bus below a root
//! port in ACPI mode, in port order.

/// Offset of the bus select register.
pub const REG_SELECT: u16 = 0x0;
/// Offset of the insert (device check) register of the selected bus: RW1C.
pub const REG_INSERT: u16 = 0x4;
/// Offset of the remove (eject request) register of the selected bus: RW1C.
pub const REG_REMOVE: u16 = 0x8;
/// Offset of the eject register of the selected bus: write-only.
pub const REG_EJECT: u16 = 0xC;
/// Offset of the bus check register of the selected bus (slots whose device vanished): RW1C.
pub const REG_BUS_CHECK: u16 = 0x10;
/// Offset of the pending buses register (bit `b`: bus `b` has events pending): read-only.
pub const REG_PENDING: u16 = 0x14;
/// Number of I/O ports of the register block.
pub const ACPI_HOTPLUG_PORTS: u16 = 0x18;
/// Device numbers per bus, one bit each in every register.
pub const SLOTS_PER_BUS: u8 = 32;
/// Buses whose pending events [`REG_PENDING`] reports (one bit each).
pub const PENDING_BUSES: u8 = 32;
/// The bus select value of the root bus.
pub const ROOT_BUS_SELECT: u8 = 0;

/// `Notify` value: Bus Check (ACPI 6.5 §5.6.6).
pub const NOTIFY_BUS_CHECK: u8 = 0;
/// `Notify` value: Device Check (ACPI 6.5 §5.6.6).
pub const NOTIFY_DEVICE_CHECK: u8 = 1;
/// `Notify` value: Eject Request (ACPI 6.5 §5.6.6).
pub const NOTIFY_EJECT_REQUEST: u8 = 3;
