//! What a PCI function looks like to the bus: configuration accesses, BAR accesses, and what a
//! configuration write asks the VMM to do.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::configuration::{BarRegion, BarReprogram};

/// What a configuration write asks of the VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "the VMM must move the mappings of reprogrammed BARs"]
pub struct ConfigWriteResult {
    /// BARs whose decoding changed; remove every `old` mapping, then add every `new` one.
    pub bar_reprograms: Vec<BarReprogram>,
}

impl ConfigWriteResult {
    /// Whether the write asks nothing of the VMM.
    pub fn is_empty(&self) -> bool {
        self.bar_reprograms.is_empty()
    }
}

impl From<Vec<BarReprogram>> for ConfigWriteResult {
    fn from(bar_reprograms: Vec<BarReprogram>) -> Self {
        ConfigWriteResult { bar_reprograms }
    }
}

/// A PCI function on a [`PciRoot`](super::bus::PciRoot).
///
/// Every method is driven by the guest, which is untrusted: any offset and any length (including
/// 0 and lengths other than 1, 2 and 4) must be handled without panicking. Reads that hit nothing
/// return all-ones; writes that hit nothing are ignored.
pub trait PciDevice: Send {
    /// A short name for logs and diagnostics (e.g. the device id given by the user).
    fn id(&self) -> &str;

    /// A guest read of configuration space at `offset` (0..4096).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);

    /// A guest write to configuration space at `offset` (0..4096).
    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult;

    /// A guest read at `offset` inside BAR `bar`. By default the BAR reads all-ones.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// A guest write at `offset` inside BAR `bar`. By default it is ignored.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// The BARs decoded now, at the addresses they are decoded at: what the VMM must have mapped
    /// for this device (e.g. to unmap them all when the device goes away). A device whose
    /// configuration space is a [`PciConfiguration`](super::configuration::PciConfiguration)
    /// returns its [`decoded_bars`](super::configuration::PciConfiguration::decoded_bars).
    /// By default: none.
    fn decoded_bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }

    /// For a bridge (e.g. a PCI Express root port): the bus number behind it on which the
    /// functions below it answer configuration requests now, that is its Secondary Bus Number
    /// while the link to them is up. `None` for an endpoint, a bridge the guest has not numbered
    /// yet (Secondary Bus Number 0), or a link that is down (requests then end in Unsupported
    /// Request: the functions read all-ones). By default: `None`.
    fn downstream_bus(&self) -> Option<u8> {
        None
    }
}

/// Whether `a` and `b` are the same device (the same allocation), whatever their vtables.
pub fn same_device(a: &SharedPciDevice, b: &SharedPciDevice) -> bool {
    std::ptr::eq(Arc::as_ptr(a) as *const (), Arc::as_ptr(b) as *const ())
}

/// A device shared between the bus and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Locks `mutex` even if a thread panicked while holding it: a device model's state stays
/// usable, and a guest cannot turn one panic into a VMM that panics on every access.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One BAR of a device as a region on the VMM's MMIO or port I/O bus: forwards accesses at an
/// offset into the region to [`PciDevice::bar_read`]/[`PciDevice::bar_write`].
///
/// Register it over `[address, address + size)` of a decoded BAR; the bus passes offsets
/// relative to the start of the registered range, which are offsets into the BAR.
#[derive(Clone)]
pub struct PciBarIo {
    device: SharedPciDevice,
    bar: usize,
}

impl PciBarIo {
    /// The region of BAR `bar` of `device`.
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        PciBarIo { device, bar }
    }

    /// The BAR index.
    pub fn bar(&self) -> usize {
        self.bar
    }

    /// The device whose BAR this is.
    pub fn device(&self) -> &SharedPciDevice {
        &self.device
    }
}

impl DeviceMmio for PciBarIo {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

impl DevicePio for PciBarIo {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, u64::from(offset), data);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, u64::from(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with a 16-byte register file in BAR 2 and defaults elsewhere.
    struct Scratch {
        regs: [u8; 16],
    }

    impl PciDevice for Scratch {
        fn id(&self) -> &str {
            "scratch"
        }
        fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) -> ConfigWriteResult {
            ConfigWriteResult::default()
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            match self.regs.get(start..start.saturating_add(data.len())) {
                Some(src) if bar == 2 => data.copy_from_slice(src),
                _ => data.fill(0xff),
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = self.regs.get_mut(start..start.saturating_add(data.len())) {
                if bar == 2 {
                    dst.copy_from_slice(data);
                }
            }
        }
    }

    struct Silent;

    impl PciDevice for Silent {
        fn id(&self) -> &str {
            "silent"
        }
        fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) -> ConfigWriteResult {
            ConfigWriteResult::default()
        }
    }

    #[test]
    fn default_bar_hooks_read_all_ones_and_ignore_writes() {
        let mut d = Silent;
        let mut buf = [0u8; 8];
        d.bar_write(0, 0, &[1, 2, 3]);
        d.bar_read(0, u64::MAX, &mut buf);
        assert_eq!(buf, [0xff; 8]);
        assert!(d.decoded_bars().is_empty());
        assert_eq!(d.id(), "silent");
    }

    #[test]
    fn bar_io_forwards_to_the_device() {
        let device: SharedPciDevice = Arc::new(Mutex::new(Scratch { regs: [0; 16] }));
        let region = PciBarIo::new(device.clone(), 2);
        assert_eq!(region.bar(), 2);
        region.mmio_write(MmioAddress(0xe000_0000), 4, &[0xaa, 0xbb]);
        let mut buf = [0u8; 2];
        region.mmio_read(MmioAddress(0xe000_0000), 4, &mut buf);
        assert_eq!(buf, [0xaa, 0xbb]);
        region.pio_read(PioAddress(0xc000), 5, &mut buf);
        assert_eq!(buf, [0xbb, 0]);
        region.pio_write(PioAddress(0xc000), 15, &[7]);
        let mut one = [0u8; 1];
        region.mmio_read(MmioAddress(0), 15, &mut one);
        assert_eq!(one, [7]);
        // Past the register file: all-ones.
        region.mmio_read(MmioAddress(0), 15, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        // Another BAR of the same device.
        PciBarIo::new(device, 0).mmio_read(MmioAddress(0), 0, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
    }

    #[test]
    fn config_write_result() {
        assert!(ConfigWriteResult::default().is_empty());
        let r = ConfigWriteResult::from(vec![BarReprogram {
            index: 0,
            kind: super::super::configuration::BarKind::Io,
            size: 4,
            old: None,
            new: Some(0x1000),
        }]);
        assert!(!r.is_empty());
    }

    #[test]
    fn poisoned_lock_is_recovered() {
        let device: SharedPciDevice = Arc::new(Mutex::new(Scratch { regs: [0; 16] }));
        let d = device.clone();
        let _ = std::thread::spawn(move || {
            let _guard = d.lock().unwrap();
            panic!("device model bug");
        })
        .join();
        assert!(device.is_poisoned());
        let mut buf = [0u8; 1];
        PciBarIo::new(device, 2).mmio_read(MmioAddress(0), 0, &mut buf);
        assert_eq!(buf, [0]);
    }
}
