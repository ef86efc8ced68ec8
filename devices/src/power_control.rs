//! The hardware-reduced ACPI power registers: sleep control, sleep status and reset.
//!
//! A hardware-reduced platform (ACPI 6.5 §4.1) has no PM1 blocks; the FADT instead points at a
//! Sleep Control Register and a Sleep Status Register (§4.8.3.7, §4.8.3.8) and at a Reset Register
//! (§4.8.3.6). Linux powers off by writing `SLP_TYPx << 2 | SLP_EN` to the sleep control register,
//! with `SLP_TYPx` taken from the DSDT's `_S5` package, and reboots by writing the FADT's reset value
//! to the reset register. This device decodes the three as consecutive byte ports and tells a
//! [`PowerHandler`].

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// Offset of the Sleep Control Register from the device's base port.
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
/// Offset of the Sleep Status Register from the device's base port.
pub const SLEEP_STATUS_OFFSET: u16 = 1;
/// Offset of the Reset Register from the device's base port.
pub const RESET_OFFSET: u16 = 2;
/// Number of ports the device decodes.
pub const POWER_CONTROL_PORTS: u16 = 3;

/// Sleep Control Register: SLP_TYPx field, bits 2..=4 (ACPI 6.5 §4.8.3.7).
pub const SLP_TYP_SHIFT: u8 = 2;
/// Sleep Control Register: SLP_TYPx field mask (after shifting).
pub const SLP_TYP_MASK: u8 = 0x7;
/// Sleep Control Register: SLP_EN, bit 5.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep Status Register: WAK_STS, bit 7 (ACPI 6.5 §4.8.3.8), write 1 to clear.
pub const WAK_STS: u8 = 1 << 7;

/// The SLP_TYPx value the DSDT's `_S5` package gives for soft-off.
pub const SLP_TYP_S5: u8 = 5;
/// The value the FADT says to write to the reset register.
pub const RESET_VALUE: u8 = 1;

/// What the VMM does when the guest asks to power off or reset.
pub trait PowerHandler: Send {
    /// The guest entered S5 (soft off).
    fn power_off(&self);
    /// The guest wrote the reset value to the reset register.
    fn reset(&self);
}

/// The sleep control, sleep status and reset registers of a hardware-reduced ACPI platform.
pub struct PowerControl {
    handler: Box<dyn PowerHandler>,
    sleep_status: u8,
}

impl PowerControl {
    /// A device that reports power-off and reset requests to `handler`.
    pub fn new(handler: Box<dyn PowerHandler>) -> Self {
        PowerControl {
            handler,
            sleep_status: 0,
        }
    }

    /// The sleep status register: the device's only state.
    pub fn sleep_status(&self) -> u8 {
        self.sleep_status
    }

    /// Puts a saved sleep status register back.
    pub fn restore_sleep_status(&mut self, value: u8) {
        self.sleep_status = value & WAK_STS;
    }
}

impl MutDevicePio for PowerControl {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), SLEEP_STATUS_OFFSET) = (data.first_mut(), offset) {
            *first = self.sleep_status;
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == SLP_TYP_S5 {
                    self.handler.power_off();
                } else {
                    // S1..S4 are not offered in the DSDT; a guest that asks anyway stays awake.
                    crate::guest_log::report(
                        "unsupported sleep type",
                        log::Level::Warn,
                        format_args!("guest asked for unsupported sleep type {slp_typ}"),
                    );
                    self.sleep_status |= WAK_STS;
                }
            }
            SLEEP_STATUS_OFFSET => self.sleep_status &= !(value & WAK_STS),
            RESET_OFFSET if value == RESET_VALUE => self.handler.reset(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<&'static str>>>);
    impl PowerHandler for Log {
        fn power_off(&self) {
            self.0.lock().unwrap().push("off");
        }
        fn reset(&self) {
            self.0.lock().unwrap().push("reset");
        }
    }

    const B: PioAddress = PioAddress(0x600);

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let log = Log::default();
        let mut d = PowerControl::new(Box::new(log.clone()));
        // SLP_TYP without SLP_EN does nothing.
        d.pio_write(B, SLEEP_CONTROL_OFFSET, &[SLP_TYP_S5 << SLP_TYP_SHIFT]);
        assert!(log.0.lock().unwrap().is_empty());
        d.pio_write(
            B,
            SLEEP_CONTROL_OFFSET,
            &[SLP_TYP_S5 << SLP_TYP_SHIFT | SLP_EN],
        );
        d.pio_write(B, RESET_OFFSET, &[RESET_VALUE + 1]);
        d.pio_write(B, RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(*log.0.lock().unwrap(), vec!["off", "reset"]);
    }

    #[test]
    fn unsupported_sleep_sets_wake_status_which_is_w1c() {
        let log = Log::default();
        let mut d = PowerControl::new(Box::new(log.clone()));
        d.pio_write(B, SLEEP_CONTROL_OFFSET, &[3 << SLP_TYP_SHIFT | SLP_EN]);
        let mut v = [0u8; 1];
        d.pio_read(B, SLEEP_STATUS_OFFSET, &mut v);
        assert_eq!(v[0], WAK_STS);
        d.pio_write(B, SLEEP_STATUS_OFFSET, &[0]);
        d.pio_read(B, SLEEP_STATUS_OFFSET, &mut v);
        assert_eq!(v[0], WAK_STS);
        d.pio_write(B, SLEEP_STATUS_OFFSET, &[WAK_STS]);
        d.pio_read(B, SLEEP_STATUS_OFFSET, &mut v);
        assert_eq!(v[0], 0);
        assert!(log.0.lock().unwrap().is_empty());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut d = PowerControl::new(Box::new(Log::default()));
        for off in 0..8u16 {
            for len in 0..9 {
                let mut b = vec![0u8; len];
                d.pio_read(B, off, &mut b);
                d.pio_write(B, off, &[0x55; 8][..len]);
            }
        }
    }
}
