//! The PCI Express host bridge: function 00:00.0 of the root bus, the function that names the
//! root complex to the guest.
//!
//! It is a plain type 0 header with class 06/00/00 (bridge, host bridge, PCI Local Bus Spec 3.0
//! appendix D), no BARs, no capabilities and no interrupt. The guest learns the root complex's
//! resources (ECAM window, bus range, MMIO and I/O windows) from ACPI (MCFG and the `PNP0A08`
//! device's `_CRS`), not from this function.
//!
//! # Why 1b36:0008
//!
//! The IDs are QEMU's PCIe host bridge (`gpex-pcihost`, `docs/specs/pci-ids.rst`: "1b36:0008 PCIe
//! host bridge"), with QEMU's default subsystem 1af4:1100, so that `lspci` reads "Red Hat, Inc.
//! QEMU PCIe Host bridge" and guests compared against QEMU see the same function. Linux has no
//! quirk and no driver for 1b36:0008 (`drivers/pci/quirks.c` matches vendor 0x1b36 only for the
//! test device 0x0005; checked for 6.1 and 6.12), whereas the IDs of real chipsets' host bridges
//! pull in chipset quirks, EDAC and AGP/GTT drivers that would poke registers this model does not
//! have (e.g. Intel's Q35 MCH 8086:29c0). The one generic quirk that applies,
//! `quirk_mmio_always_on` for class 06/00, is harmless: the bridge has no BARs.

use super::configuration::{PciConfiguration, PciConfigurationState, PciIdentity};
use super::device::{ConfigWriteResult, PciDevice};
use crate::state::StateError;

/// Vendor ID of the host bridge: Red Hat, Inc.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the host bridge: QEMU PCIe host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Subsystem vendor ID: Red Hat/Qumranet, as QEMU sets by default.
pub const HOST_BRIDGE_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem ID: QEMU, as QEMU sets by default.
pub const HOST_BRIDGE_SUBSYSTEM_ID: u16 = 0x1100;
/// Base class: bridge device.
pub const CLASS_BRIDGE: u8 = 0x06;
/// Sub-class of [`CLASS_BRIDGE`]: host bridge.
pub const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// The host bridge function at 00:00.0. See the module documentation.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// A host bridge with the IDs documented above.
    pub fn new() -> Self {
        let identity = PciIdentity {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision_id: 0,
            class_code: CLASS_BRIDGE,
            subclass: SUBCLASS_HOST_BRIDGE,
            prog_if: 0,
            multifunction: false,
        };
        PciHostBridge {
            config: PciConfiguration::new_type0(
                &identity,
                HOST_BRIDGE_SUBSYSTEM_VENDOR_ID,
                HOST_BRIDGE_SUBSYSTEM_ID,
            ),
        }
    }

    /// The configuration space, for inspection.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn id(&self) -> &str {
        "host-bridge"
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
        self.config.write(offset, data).into()
    }

    fn decoded_bars(&self) -> Vec<super::configuration::BarRegion> {
        self.config.decoded_bars()
    }
}

impl PciHostBridge {
    /// The bridge's configuration space now.
    pub fn state(&self) -> PciConfigurationState {
        self.config.state()
    }

    /// Puts a saved configuration space back (refused if it is not a host bridge's like this
    /// one).
    pub fn restore(&mut self, state: &PciConfigurationState) -> Result<(), StateError> {
        self.config.restore("host bridge", state)
    }
}

#[cfg(test)]
mod tests {
    use super::super::configuration::{
        CAPABILITIES_POINTER, COMMAND, HEADER_TYPE, INTERRUPT_PIN, STATUS, STATUS_CAPABILITIES_LIST,
    };
    use super::*;

    fn read32(bridge: &mut PciHostBridge, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        bridge.config_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity() {
        let mut b = PciHostBridge::default();
        assert_eq!(read32(&mut b, 0x00), 0x0008_1b36);
        assert_eq!(read32(&mut b, 0x08), 0x0600_0000);
        assert_eq!(read32(&mut b, 0x2c), 0x1100_1af4);
        assert_eq!(b.config().read_u8(HEADER_TYPE), 0);
        assert_eq!(b.config().read_u8(INTERRUPT_PIN), 0);
        assert_eq!(b.config().read_u8(CAPABILITIES_POINTER), 0);
        assert_eq!(b.config().read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(b.id(), "host-bridge");
    }

    #[test]
    fn no_bars_so_no_reprogramming() {
        let mut b = PciHostBridge::new();
        for bar in 0..6u16 {
            assert!(b.config_write(0x10 + 4 * bar, &[0xff; 4]).is_empty());
            assert_eq!(read32(&mut b, 0x10 + 4 * bar), 0);
        }
        assert!(b.config_write(COMMAND, &[0x07, 0x00]).is_empty());
        assert_eq!(b.config().read_u16(COMMAND), 0x07);
        assert!(b.decoded_bars().is_empty());
        // The identity ignores writes.
        let _ = b.config_write(0, &[0; 4]);
        assert_eq!(read32(&mut b, 0), 0x0008_1b36);
    }
}
