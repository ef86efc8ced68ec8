//! PCI core: configuration space with per-bit register semantics, the device trait, the host
//! bridge, and the segment with its two configuration access mechanisms (0xCF8/0xCFC and ECAM).
//!
//! # Wiring a segment into a VMM
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use hotplug_vmm_devices::pci::{
//!     BarReprogram, BarReprogrammingHandler, Bdf, PciConfigIo, PciConfigMmio, PciHostBridge,
//!     PciRoot, SharedPciDevice, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_COUNT,
//! };
//! use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
//! use vm_device::device_manager::{IoManager, MmioManager, PioManager};
//!
//! struct MoveBars; // in a VMM: unmap `old`, map a `PciBarIo` at `new`
//! impl BarReprogrammingHandler for MoveBars {
//!     fn reprogram_bars(&self, bdf: Bdf, _dev: &SharedPciDevice, changes: &[BarReprogram]) {
//!         for c in changes {
//!             println!("{bdf} BAR{}: {:?} -> {:?}", c.index, c.old, c.new);
//!         }
//!     }
//! }
//!
//! let root = Arc::new(Mutex::new(PciRoot::new()));
//! root.lock()
//!     .unwrap()
//!     .add_device(Bdf::new(0, 0, 0).unwrap(), Arc::new(Mutex::new(PciHostBridge::new())))
//!     .unwrap();
//! let handler: Arc<dyn BarReprogrammingHandler> = Arc::new(MoveBars);
//!
//! let mut io = IoManager::new();
//! let cf8 = PciConfigIo::new(root.clone(), Some(handler.clone()));
//! io.register_pio(
//!     PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_COUNT).unwrap(),
//!     Arc::new(Mutex::new(cf8)),
//! )
//! .unwrap();
//! let ecam = PciConfigMmio::new(root.clone(), 256, Some(handler));
//! let ecam_base = 0xe000_0000; // what MCFG says
//! io.register_mmio(
//!     MmioRange::new(MmioAddress(ecam_base), ecam.size()).unwrap(),
//!     Arc::new(Mutex::new(ecam)),
//! )
//! .unwrap();
//!
//! // The guest reads 00:00.0's vendor and device IDs both ways.
//! io.pio_write(PioAddress(0xcf8), &0x8000_0000u32.to_le_bytes()).unwrap();
//! let mut id = [0u8; 4];
//! io.pio_read(PioAddress(0xcfc), &mut id).unwrap();
//! assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
//! io.mmio_read(MmioAddress(ecam_base), &mut id).unwrap();
//! assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
//! ```

pub mod bar_space;
pub mod bus;
pub mod configuration;
pub mod device;
pub mod host_bridge;
pub mod msix;
pub mod root_port;
pub mod slot;

pub use bar_space::{BarMapping, BarSpace, VacatedRegion, VacatedWrites};
pub use bus::{
    BarReprogrammingHandler, Bdf, PciBusError, PciConfigIo, PciConfigMmio, PciRoot,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_COUNT,
};
pub use configuration::{
    BarKind, BarRegion, BarReprogram, HeaderType, PciConfigError, PciConfiguration,
    PciConfigurationState, PciIdentity,
};
pub use device::{same_device, ConfigWriteResult, PciBarIo, PciDevice, SharedPciDevice};
pub use host_bridge::PciHostBridge;
pub use root_port::{PcieRootPort, RootPortOptions, SlotObserver};
pub use slot::{HotplugSlot, Indicator, SlotCapabilities, SlotError, SlotEvent, SlotNotifications};
