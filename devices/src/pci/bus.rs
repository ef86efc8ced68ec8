//! One PCI segment and the two ways a guest reaches its configuration space.
//!
//! [`PciRoot`] holds the functions of segment 0: those on bus 0 keyed by bus/device/function
//! ([`Bdf`]), and those below a bridge on bus 0 (a root port's slot) keyed by the bridge. The
//! guest numbers the buses: a function below a bridge answers at the bus number the bridge's
//! Secondary Bus Number register holds, while its link is up.
//!
//! Two access mechanisms forward to a shared `Arc<Mutex<PciRoot>>`:
//!
//! - [`PciConfigIo`], the legacy configuration mechanism #1 at ports 0xCF8..=0xCFF
//!   (PCI Local Bus Spec 3.0 §3.2.2.3.2), reaching the first 256 bytes of each function;
//! - [`PciConfigMmio`], the Enhanced Configuration Access Mechanism (ECAM, PCI Express Base Spec
//!   5.0 §7.2.2), reaching all 4096 bytes.
//!
//! Both report BARs that a configuration write reprogrammed to an optional
//! [`BarReprogrammingHandler`], called after every lock of this module has been released.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use super::configuration::{BarReprogram, CONFIG_SPACE_SIZE};
use super::device::{lock, ConfigWriteResult, SharedPciDevice};

/// Number of device numbers on a bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Number of functions of a device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// Address of a function in a segment: bus (0..=255), device (0..=31), function (0..=7).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// The function `bus:device.function`; `None` if `device > 31` or `function > 7`.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device < DEVICES_PER_BUS && function < FUNCTIONS_PER_DEVICE {
            Some(Bdf {
                bus,
                device,
                function,
            })
        } else {
            None
        }
    }

    /// The function with `devfn = device << 3 | function` on `bus`.
    pub const fn from_devfn(bus: u8, devfn: u8) -> Bdf {
        Bdf {
            bus,
            device: devfn >> 3,
            function: devfn & 0x7,
        }
    }

    /// Bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }

    /// Device number.
    pub const fn device(self) -> u8 {
        self.device
    }

    /// Function number.
    pub const fn function(self) -> u8 {
        self.function
    }

    /// `device << 3 | function`.
    pub const fn devfn(self) -> u8 {
        (self.device << 3) | self.function
    }
}

impl fmt::Display for Bdf {
    /// Formats as `bb:dd.f` in hex, like `lspci`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// Errors in managing a [`PciRoot`].
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PciBusError {
    /// A function already exists at this address.
    #[error("PCI address {0} is already in use")]
    AddressInUse(Bdf),
    /// Only bus 0 holds functions directly; the others are behind bridges.
    #[error("PCI address {0} is not on bus 0")]
    NotOnRootBus(Bdf),
    /// No function at this address to put a device below.
    #[error("no bridge at {0}")]
    NoSuchBridge(Bdf),
}

/// The functions of one PCI segment: those on bus 0, keyed by [`Bdf`], and those below bridges
/// on bus 0 (the device in a root port's slot), keyed by the bridge and their device/function
/// number. A function below a bridge answers at `(b, devfn)` while the bridge reports `b` as its
/// [`downstream_bus`](super::device::PciDevice::downstream_bus): the guest numbers buses, and a link that is
/// down hides the functions behind it.
#[derive(Default)]
pub struct PciRoot {
    devices: BTreeMap<Bdf, SharedPciDevice>,
    downstream: BTreeMap<(Bdf, u8), SharedPciDevice>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciRoot")
            .field("bus0", &self.devices.keys().collect::<Vec<_>>())
            .field("downstream", &self.downstream.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PciRoot {
    /// A segment with no functions (add a [`PciHostBridge`](super::host_bridge::PciHostBridge)
    /// at 00:00.0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `bdf` on bus 0. Fails if the address is taken or not on bus 0 (a
    /// function below a bridge goes in with [`add_downstream_device`](Self::add_downstream_device)).
    pub fn add_device(&mut self, bdf: Bdf, device: SharedPciDevice) -> Result<(), PciBusError> {
        if bdf.bus() != 0 {
            return Err(PciBusError::NotOnRootBus(bdf));
        }
        if self.devices.contains_key(&bdf) {
            return Err(PciBusError::AddressInUse(bdf));
        }
        self.devices.insert(bdf, device);
        Ok(())
    }

    /// Takes the function at `bdf` on bus 0 away; from then on its configuration space reads
    /// all-ones. Functions below it stay until removed.
    pub fn remove_device(&mut self, bdf: Bdf) -> Option<SharedPciDevice> {
        self.devices.remove(&bdf)
    }

    /// Puts `device` below the bridge at `bridge` (on bus 0) as device/function `devfn` of the
    /// bus behind it. Fails if there is no function at `bridge` or `devfn` is taken there.
    pub fn add_downstream_device(
        &mut self,
        bridge: Bdf,
        devfn: u8,
        device: SharedPciDevice,
    ) -> Result<(), PciBusError> {
        if !self.devices.contains_key(&bridge) {
            return Err(PciBusError::NoSuchBridge(bridge));
        }
        if self.downstream.contains_key(&(bridge, devfn)) {
            return Err(PciBusError::AddressInUse(Bdf::from_devfn(0, devfn)));
        }
        self.downstream.insert((bridge, devfn), device);
        Ok(())
    }

    /// Takes the function `devfn` below `bridge` away.
    pub fn remove_downstream_device(&mut self, bridge: Bdf, devfn: u8) -> Option<SharedPciDevice> {
        self.downstream.remove(&(bridge, devfn))
    }

    /// The function `devfn` below `bridge`, whether or not the guest can reach it now.
    pub fn downstream_device(&self, bridge: Bdf, devfn: u8) -> Option<SharedPciDevice> {
        self.downstream.get(&(bridge, devfn)).cloned()
    }

    /// The function the guest reaches at `bdf` now. For a bus other than 0 this locks the
    /// bridges on bus 0 in turn to read their bus numbers.
    pub fn device(&self, bdf: Bdf) -> Option<SharedPciDevice> {
        if bdf.bus() == 0 {
            return self.devices.get(&bdf).cloned();
        }
        let bridge = self
            .downstream
            .keys()
            .filter(|(_, devfn)| *devfn == bdf.devfn())
            .map(|(bridge, _)| *bridge)
            .find(|bridge| {
                self.devices
                    .get(bridge)
                    .is_some_and(|d| lock(d).downstream_bus() == Some(bdf.bus()))
            })?;
        self.downstream.get(&(bridge, bdf.devfn())).cloned()
    }

    /// Every function on bus 0, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (Bdf, &SharedPciDevice)> {
        self.devices.iter().map(|(bdf, d)| (*bdf, d))
    }

    /// Every function below a bridge: `(bridge, devfn, device)`.
    pub fn downstream_devices(&self) -> impl Iterator<Item = (Bdf, u8, &SharedPciDevice)> {
        self.downstream.iter().map(|((b, f), d)| (*b, *f, d))
    }

    /// A configuration read of the function at `bdf`; all-ones (Vendor ID 0xFFFF) if there is
    /// none. Locks the device while `self` is borrowed.
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        match self.device(bdf) {
            Some(device) => lock(&device).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write to the function at `bdf`; ignored if there is none. Locks the device
    /// while `self` is borrowed.
    pub fn config_write(&self, bdf: Bdf, offset: u16, data: &[u8]) -> ConfigWriteResult {
        match self.device(bdf) {
            Some(device) => lock(&device).config_write(offset, data),
            None => ConfigWriteResult::default(),
        }
    }
}

/// Told when a guest configuration write changed where BARs are decoded, so that the VMM moves
/// the device's MMIO/PIO mappings (e.g. registering a
/// [`PciBarIo`](super::device::PciBarIo) for each `new` address).
///
/// Called from the vCPU thread that made the access, with no lock of this crate held (neither the
/// [`PciRoot`] nor the device), so the handler may lock them. It must not need exclusive access to
/// the I/O bus the access is being dispatched from, unless that bus allows it during dispatch.
/// The device may have been removed from the [`PciRoot`] by another thread in the meantime.
pub trait BarReprogrammingHandler: Send + Sync {
    /// BARs of `device` at `bdf` moved: for each change remove the mapping at `old` (if any),
    /// then add the mapping at `new` (if any). Apply all removals of `changes` before any addition.
    fn reprogram_bars(&self, bdf: Bdf, device: &SharedPciDevice, changes: &[BarReprogram]);
}

/// What both access mechanisms share: the segment and the handler.
#[derive(Clone)]
struct ConfigAccess {
    root: Arc<Mutex<PciRoot>>,
    handler: Option<Arc<dyn BarReprogrammingHandler>>,
}

impl ConfigAccess {
    fn read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        let device = lock(&self.root).device(bdf);
        match device {
            Some(device) => lock(&device).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, bdf: Bdf, offset: u16, data: &[u8]) {
        let Some(device) = lock(&self.root).device(bdf) else {
            return;
        };
        let result = lock(&device).config_write(offset, data);
        if result.bar_reprograms.is_empty() {
            return;
        }
        match &self.handler {
            Some(handler) => handler.reprogram_bars(bdf, &device, &result.bar_reprograms),
            None => log::debug!(
                "PCI {bdf}: BAR reprogramming with no handler: {:?}",
                result.bar_reprograms
            ),
        }
    }
}

/// The legacy configuration mechanism (PCI Local Bus Spec 3.0 §3.2.2.3.2): a 32-bit
/// CONFIG_ADDRESS register at 0xCF8 and a 32-bit CONFIG_DATA window at 0xCFC..=0xCFF.
///
/// Register it over the 8 ports [`PCI_CONFIG_IO_PORT`]..+[`PCI_CONFIG_IO_PORT_COUNT`]; it decodes
/// offsets from the start of its registered range.
///
/// CONFIG_ADDRESS: bit 31 enable, bits 23:16 bus, 15:11 device, 10:8 function, 7:2 register;
/// bits 1:0 read as zero. Bits 30:24 are reserved; bits 27:24 hold the AMD-style extended
/// register number on some chipsets, which this model does **not** support: they read back as
/// written, and while any of them is set CONFIG_DATA reaches no function (reads all-ones).
/// Only 32-bit accesses at 0xCF8 reach CONFIG_ADDRESS; other accesses to 0xCF8..=0xCFB read
/// all-ones and are ignored (Linux probes with a byte write to 0xCFB).
///
/// CONFIG_DATA: an access of 1..=4 bytes at 0xCFC + n that stays inside the data dword reaches
/// register `(CONFIG_ADDRESS & 0xFC) + n`, if the enable bit is set; otherwise it reads all-ones
/// and writes are ignored.
pub struct PciConfigIo {
    access: ConfigAccess,
    address: u32,
}

/// The first port of [`PciConfigIo`]: CONFIG_ADDRESS.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Number of ports [`PciConfigIo`] decodes: 0xCF8..=0xCFF.
pub const PCI_CONFIG_IO_PORT_COUNT: u16 = 8;
/// CONFIG_ADDRESS bit 31: configuration access enable.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits 27:24: AMD-style extended register number (unsupported).
pub const CONFIG_ADDRESS_EXTENDED_REGISTER: u32 = 0x0f00_0000;
/// CONFIG_ADDRESS bits that read back: enable, extended register, bus, device, function,
/// register.
const CONFIG_ADDRESS_STORED: u32 = CONFIG_ADDRESS_ENABLE | 0x0fff_fffc;

/// Offset of CONFIG_DATA from CONFIG_ADDRESS.
const CONFIG_DATA_OFFSET: u16 = 4;

impl PciConfigIo {
    /// The mechanism over `root`, reporting BAR changes to `handler` if given.
    pub fn new(
        root: Arc<Mutex<PciRoot>>,
        handler: Option<Arc<dyn BarReprogrammingHandler>>,
    ) -> Self {
        PciConfigIo {
            access: ConfigAccess { root, handler },
            address: 0,
        }
    }

    /// The current CONFIG_ADDRESS value: the mechanism's only state (a guest may pause
    /// between writing CONFIG_ADDRESS and accessing CONFIG_DATA).
    pub fn config_address(&self) -> u32 {
        self.address
    }

    /// Puts a saved CONFIG_ADDRESS back (only the bits that read back are kept).
    pub fn restore_config_address(&mut self, address: u32) {
        self.address = address & CONFIG_ADDRESS_STORED;
    }

    /// The function and register CONFIG_ADDRESS selects, if the enable bit is set and no
    /// unsupported extended register bit is.
    fn target(&self) -> Option<(Bdf, u16)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0
            || self.address & CONFIG_ADDRESS_EXTENDED_REGISTER != 0
        {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let devfn = (self.address >> 8) as u8;
        let register = (self.address & 0xfc) as u16;
        Some((Bdf::from_devfn(bus, devfn), register))
    }

    /// The function and register an access of `len` bytes at data port offset `n` reaches.
    fn data_target(&self, n: u16, len: usize) -> Option<(Bdf, u16)> {
        if len == 0 || usize::from(n) + len > 4 {
            return None;
        }
        self.target().map(|(bdf, register)| (bdf, register + n))
    }

    /// A read at `offset` from the first port (0xCF8).
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset < CONFIG_DATA_OFFSET {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match offset
            .checked_sub(CONFIG_DATA_OFFSET)
            .and_then(|n| self.data_target(n, data.len()))
        {
            Some((bdf, register)) => self.access.read(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    /// A write at `offset` from the first port (0xCF8).
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if offset < CONFIG_DATA_OFFSET {
            if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
                self.address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_STORED;
            }
            return;
        }
        if let Some((bdf, register)) = offset
            .checked_sub(CONFIG_DATA_OFFSET)
            .and_then(|n| self.data_target(n, data.len()))
        {
            self.access.write(bdf, register, data);
        }
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

/// Bytes of ECAM window per bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The Enhanced Configuration Access Mechanism (PCI Express Base Spec 5.0 §7.2.2): a memory
/// window where the function at `bus:dev.fn`'s register `reg` is at offset
/// `bus << 20 | dev << 15 | fn << 12 | reg`.
///
/// Register it over [`PciConfigMmio::size`] bytes at the ECAM base the MCFG table gives for bus
/// 0; it decodes offsets from the start of its registered range. An access reaches a function
/// when it is 1..=4 bytes long and stays inside one dword (§7.2.2.2 leaves other accesses
/// undefined); other accesses, and accesses to buses past the window, read all-ones and are
/// ignored.
pub struct PciConfigMmio {
    access: ConfigAccess,
    num_buses: u16,
}

impl PciConfigMmio {
    /// The mechanism over `root` for buses `0..num_buses` (clamped to 1..=256), reporting BAR
    /// changes to `handler` if given.
    pub fn new(
        root: Arc<Mutex<PciRoot>>,
        num_buses: u16,
        handler: Option<Arc<dyn BarReprogrammingHandler>>,
    ) -> Self {
        PciConfigMmio {
            access: ConfigAccess { root, handler },
            num_buses: num_buses.clamp(1, 256),
        }
    }

    /// Number of buses the window covers.
    pub fn num_buses(&self) -> u16 {
        self.num_buses
    }

    /// Size of the window in bytes: 1 MiB per bus.
    pub fn size(&self) -> u64 {
        u64::from(self.num_buses) * ECAM_BUS_SIZE
    }

    /// The function and register an access of `len` bytes at `offset` reaches.
    fn target(&self, offset: u64, len: usize) -> Option<(Bdf, u16)> {
        if offset >= self.size() {
            return None;
        }
        let register = (offset & (CONFIG_SPACE_SIZE as u64 - 1)) as u16;
        if len == 0 || usize::from(register % 4) + len > 4 {
            return None;
        }
        let bus = (offset >> 20) as u8;
        let devfn = (offset >> 12) as u8;
        Some((Bdf::from_devfn(bus, devfn), register))
    }

    /// A read at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((bdf, register)) => self.access.read(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    /// A write at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, register)) = self.target(offset, data.len()) {
            self.access.write(bdf, register, data);
        }
    }
}

impl MutDeviceMmio for PciConfigMmio {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::super::configuration::{
        BarKind, PciConfiguration, PciIdentity, COMMAND, COMMAND_MEMORY_SPACE, INTERRUPT_LINE,
    };
    use super::super::device::PciDevice;
    use super::super::host_bridge::PciHostBridge;
    use super::*;
    use vm_device::bus::{MmioRange, PioRange};
    use vm_device::device_manager::{IoManager, MmioManager, PioManager};

    /// A device that records the accesses it sees and holds a real configuration space with one
    /// 32-bit memory BAR of 4 KiB.
    struct Probe {
        config: PciConfiguration,
        reads: Vec<(u16, usize)>,
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl Probe {
        fn new(device_id: u16) -> Self {
            let identity = PciIdentity {
                vendor_id: 0x1af4,
                device_id,
                revision_id: 1,
                class_code: 0x01,
                subclass: 0x00,
                prog_if: 0,
                multifunction: false,
            };
            let mut config = PciConfiguration::new_type0(&identity, 0x1af4, 0x0002);
            config
                .add_bar(
                    0,
                    0x1000,
                    BarKind::Memory32 {
                        prefetchable: false,
                    },
                )
                .unwrap();
            Probe {
                config,
                reads: Vec::new(),
                writes: Vec::new(),
            }
        }
    }

    impl PciDevice for Probe {
        fn id(&self) -> &str {
            "probe"
        }
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
            self.writes.push((offset, data.to_vec()));
            self.config.write(offset, data).into()
        }
        fn decoded_bars(&self) -> Vec<super::super::configuration::BarRegion> {
            self.config.decoded_bars()
        }
    }

    /// A bridge whose downstream bus the test sets.
    struct FakeBridge {
        bus: Option<u8>,
    }

    impl PciDevice for FakeBridge {
        fn id(&self) -> &str {
            "bridge"
        }
        fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0x11);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) -> ConfigWriteResult {
            ConfigWriteResult::default()
        }
        fn downstream_bus(&self) -> Option<u8> {
            self.bus
        }
    }

    /// Records every handler call; locks the root and the device to prove no lock is held.
    struct Recorder {
        root: Arc<Mutex<PciRoot>>,
        calls: Mutex<Vec<(Bdf, Vec<BarReprogram>)>>,
    }

    impl BarReprogrammingHandler for Recorder {
        fn reprogram_bars(&self, bdf: Bdf, device: &SharedPciDevice, changes: &[BarReprogram]) {
            assert!(self.root.try_lock().is_ok(), "root lock held");
            assert!(device.try_lock().is_ok(), "device lock held");
            self.calls.lock().unwrap().push((bdf, changes.to_vec()));
        }
    }

    fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf::new(bus, device, function).unwrap()
    }

    struct Fixture {
        root: Arc<Mutex<PciRoot>>,
        bridge: Arc<Mutex<FakeBridge>>,
        probe: Arc<Mutex<Probe>>,
        recorder: Arc<Recorder>,
        io: PciConfigIo,
        ecam: PciConfigMmio,
    }

    /// Host bridge at 00:00.0, a bridge at 00:1f.0 to bus 2, a probe at 02:03.4 behind it.
    fn fixture() -> Fixture {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let probe = Arc::new(Mutex::new(Probe::new(0x1042)));
        let bridge = Arc::new(Mutex::new(FakeBridge { bus: Some(2) }));
        {
            let mut r = root.lock().unwrap();
            r.add_device(bdf(0, 0, 0), Arc::new(Mutex::new(PciHostBridge::new())))
                .unwrap();
            r.add_device(bdf(0, 0x1f, 0), bridge.clone()).unwrap();
            r.add_downstream_device(bdf(0, 0x1f, 0), bdf(2, 3, 4).devfn(), probe.clone())
                .unwrap();
        }
        let recorder = Arc::new(Recorder {
            root: root.clone(),
            calls: Mutex::new(Vec::new()),
        });
        let handler: Arc<dyn BarReprogrammingHandler> = recorder.clone();
        Fixture {
            bridge,
            io: PciConfigIo::new(root.clone(), Some(handler.clone())),
            ecam: PciConfigMmio::new(root.clone(), 256, Some(handler)),
            root,
            probe,
            recorder,
        }
    }

    fn cf8(bus: u8, device: u8, function: u8, register: u8) -> u32 {
        CONFIG_ADDRESS_ENABLE
            | (u32::from(bus) << 16)
            | (u32::from(device) << 11)
            | (u32::from(function) << 8)
            | u32::from(register)
    }

    fn ecam(bus: u8, device: u8, function: u8, register: u16) -> u64 {
        (u64::from(bus) << 20)
            | (u64::from(device) << 15)
            | (u64::from(function) << 12)
            | u64::from(register)
    }

    fn io_read32(io: &mut PciConfigIo, address: u32) -> u32 {
        io.write(0, &address.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bdf_basics() {
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
        let b = bdf(0x12, 0x1f, 7);
        assert_eq!((b.bus(), b.device(), b.function()), (0x12, 0x1f, 7));
        assert_eq!(b.devfn(), 0xff);
        assert_eq!(Bdf::from_devfn(0x12, 0xff), b);
        assert_eq!(b.to_string(), "12:1f.7");
    }

    #[test]
    fn root_add_remove() {
        let mut root = PciRoot::new();
        let d: SharedPciDevice = Arc::new(Mutex::new(PciHostBridge::new()));
        root.add_device(bdf(0, 0, 0), d.clone()).unwrap();
        assert_eq!(
            root.add_device(bdf(0, 0, 0), d),
            Err(PciBusError::AddressInUse(bdf(0, 0, 0)))
        );
        let mut b = [0u8; 4];
        root.config_read(bdf(0, 0, 0), 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        assert_eq!(root.devices().count(), 1);
        assert!(root.remove_device(bdf(0, 0, 0)).is_some());
        assert!(root.remove_device(bdf(0, 0, 0)).is_none());
        root.config_read(bdf(0, 0, 0), 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(root
            .config_write(bdf(0, 0, 0), INTERRUPT_LINE, &[1])
            .is_empty());
        assert!(root.device(bdf(0, 0, 0)).is_none());
    }

    #[test]
    fn cf8_address_register() {
        let mut f = fixture();
        // Linux's pci_check_type1: byte write to 0xCFB, then a 32-bit round trip of 0x80000000.
        f.io.write(3, &[0x01]);
        assert_eq!(f.io.config_address(), 0);
        f.io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        f.io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // Bits 1:0 and the reserved bits 30:28 read as zero.
        f.io.write(0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(f.io.config_address(), 0x8fff_fffc);
        // Narrow or misaligned accesses to the address port are ignored and read all-ones.
        f.io.write(0, &[0u8; 2]);
        f.io.write(1, &[0u8; 1]);
        f.io.write(2, &[0u8; 2]);
        assert_eq!(f.io.config_address(), 0x8fff_fffc);
        for (offset, len) in [(0u16, 1usize), (0, 2), (1, 1), (2, 2), (3, 1), (1, 2)] {
            let mut b = [0u8; 4];
            f.io.read(offset, &mut b[..len]);
            assert!(b[..len].iter().all(|&x| x == 0xff), "{offset}/{len}");
        }
    }

    #[test]
    fn cf8_decoding() {
        let mut f = fixture();
        assert_eq!(io_read32(&mut f.io, cf8(0, 0, 0, 0)), 0x0008_1b36);
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 4, 0)), 0x1042_1af4);
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 4, 8)), 0x0100_0001);
        // Absent functions.
        assert_eq!(io_read32(&mut f.io, cf8(0, 1, 0, 0)), 0xffff_ffff);
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 5, 0)), 0xffff_ffff);
        assert_eq!(io_read32(&mut f.io, cf8(3, 3, 4, 0)), 0xffff_ffff);
        // Enable bit off.
        assert_eq!(io_read32(&mut f.io, cf8(0, 0, 0, 0) & !(1 << 31)), u32::MAX);
        // Extended register bits set: not supported, reaches nothing.
        assert_eq!(io_read32(&mut f.io, cf8(0, 0, 0, 0) | (1 << 24)), u32::MAX);
        // Byte and word accesses at 0xCFC + n reach register + n.
        f.io.write(0, &cf8(2, 3, 4, 0).to_le_bytes());
        let mut byte = [0u8; 1];
        f.io.read(5, &mut byte);
        assert_eq!(byte, [0x1a]);
        f.io.read(7, &mut byte);
        assert_eq!(byte, [0x10]);
        let mut word = [0u8; 2];
        f.io.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1042);
        f.io.read(5, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x421a);
        let p = f.probe.lock().unwrap();
        assert_eq!(
            &p.reads[p.reads.len() - 4..],
            &[(1, 1), (3, 1), (2, 2), (1, 2)]
        );
        drop(p);
        // Accesses that leave the data dword reach nothing.
        f.io.read(6, &mut [0u8; 4]);
        let mut four = [0u8; 4];
        f.io.read(7, &mut four[..2]);
        assert_eq!(&four[..2], &[0xff, 0xff]);
        // The register field ignores bits 1:0 of CONFIG_ADDRESS.
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 4, 2)), 0x1042_1af4);
        // Writes through the data port: interrupt line at 0x3C + 0, via 0xCFC.
        f.io.write(0, &cf8(2, 3, 4, 0x3c).to_le_bytes());
        f.io.write(4, &[0x0b]);
        assert_eq!(f.probe.lock().unwrap().config.read_u8(INTERRUPT_LINE), 0x0b);
        f.io.write(6, &[0x55]); // register 0x3E (Min_Gnt, read-only)
        assert_eq!(
            f.probe.lock().unwrap().writes.last().unwrap(),
            &(0x3e, vec![0x55])
        );
        // Writes with the enable bit off reach nothing.
        let writes = f.probe.lock().unwrap().writes.len();
        f.io.write(0, &(cf8(2, 3, 4, 0x3c) & !(1 << 31)).to_le_bytes());
        f.io.write(4, &[0x0c]);
        assert_eq!(f.probe.lock().unwrap().writes.len(), writes);
        assert_eq!(f.probe.lock().unwrap().config.read_u8(INTERRUPT_LINE), 0x0b);
    }

    #[test]
    fn ecam_decoding() {
        let mut f = fixture();
        let mut b = [0u8; 4];
        f.ecam.read(ecam(0, 0, 0, 0), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        f.ecam.read(ecam(2, 3, 4, 0), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
        // Extended space is reachable.
        f.ecam.read(ecam(2, 3, 4, 0xffc), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        assert_eq!(f.probe.lock().unwrap().reads.last(), Some(&(0xffc, 4)));
        // Bus, device, function and register fields each select.
        for (bus, dev, func) in [(3, 3, 4), (2, 2, 4), (2, 3, 3), (2, 3, 5), (0, 1, 0)] {
            f.ecam.read(ecam(bus, dev, func, 0), &mut b);
            assert_eq!(b, [0xff; 4], "{bus}:{dev}.{func}");
        }
        let mut w = [0u8; 2];
        f.ecam.read(ecam(2, 3, 4, 0x2e), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0002);
        let mut byte = [0u8; 1];
        f.ecam.read(ecam(2, 3, 4, 0x0b), &mut byte);
        assert_eq!(byte, [0x01]);
        // Accesses crossing a dword, or of 0/8 bytes, reach nothing.
        let reads = f.probe.lock().unwrap().reads.len();
        f.ecam.read(ecam(2, 3, 4, 2), &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut eight = [0u8; 8];
        f.ecam.read(ecam(2, 3, 4, 0), &mut eight);
        assert_eq!(eight, [0xff; 8]);
        f.ecam.read(ecam(2, 3, 4, 0), &mut []);
        assert_eq!(f.probe.lock().unwrap().reads.len(), reads);
        // Writes.
        f.ecam.write(ecam(2, 3, 4, 0x3c), &[0x0a]);
        assert_eq!(f.probe.lock().unwrap().config.read_u8(INTERRUPT_LINE), 0x0a);
        f.ecam.write(ecam(2, 3, 4, 0x3e), &[0, 0, 0, 0]); // crosses the end of the dword
        assert_eq!(f.probe.lock().unwrap().writes.len(), 1);
    }

    #[test]
    fn ecam_bus_limit() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock()
            .unwrap()
            .add_device(
                bdf(0, 1, 0),
                Arc::new(Mutex::new(FakeBridge { bus: Some(1) })),
            )
            .unwrap();
        root.lock()
            .unwrap()
            .add_downstream_device(bdf(0, 1, 0), 0, Arc::new(Mutex::new(PciHostBridge::new())))
            .unwrap();
        let mut one_bus = PciConfigMmio::new(root.clone(), 1, None);
        assert_eq!(one_bus.size(), 1 << 20);
        let mut b = [0u8; 4];
        one_bus.read(ecam(1, 0, 0, 0), &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut two = PciConfigMmio::new(root.clone(), 2, None);
        two.read(ecam(1, 0, 0, 0), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        assert_eq!(PciConfigMmio::new(root.clone(), 0, None).num_buses(), 1);
        let all = PciConfigMmio::new(root, 1000, None);
        assert_eq!((all.num_buses(), all.size()), (256, 256 << 20));
    }

    #[test]
    fn bar_reprogram_reaches_the_handler_from_both_mechanisms() {
        let mut f = fixture();
        // Program BAR0 via ECAM, then enable memory via CF8/CFC.
        f.ecam
            .write(ecam(2, 3, 4, 0x10), &0xe000_0000u32.to_le_bytes());
        assert!(f.recorder.calls.lock().unwrap().is_empty());
        f.io.write(0, &cf8(2, 3, 4, COMMAND as u8).to_le_bytes());
        f.io.write(4, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let expected = BarReprogram {
            index: 0,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: 0x1000,
            old: None,
            new: Some(0xe000_0000),
        };
        assert_eq!(
            f.recorder.calls.lock().unwrap().as_slice(),
            &[(bdf(2, 3, 4), vec![expected])]
        );
        // Move it via a 16-bit write to the upper half of the BAR through 0xCFE.
        f.io.write(0, &cf8(2, 3, 4, 0x10).to_le_bytes());
        f.io.write(6, &0xe010u16.to_le_bytes());
        let calls = f.recorder.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[1].1[0].old, calls[1].1[0].new),
            (Some(0xe000_0000), Some(0xe010_0000))
        );
        drop(calls);
        assert_eq!(
            f.probe.lock().unwrap().decoded_bars()[0].address,
            0xe010_0000
        );
        // Sizing with decoding on: unmapped, then remapped.
        f.ecam.write(ecam(2, 3, 4, 0x10), &[0xff; 4]);
        let mut b = [0u8; 4];
        f.ecam.read(ecam(2, 3, 4, 0x10), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_f000);
        f.ecam
            .write(ecam(2, 3, 4, 0x10), &0xe010_0000u32.to_le_bytes());
        let calls = f.recorder.calls.lock().unwrap();
        assert_eq!(calls.len(), 4);
        assert_eq!(
            (calls[2].1[0].old, calls[2].1[0].new),
            (Some(0xe010_0000), None)
        );
        assert_eq!(
            (calls[3].1[0].old, calls[3].1[0].new),
            (None, Some(0xe010_0000))
        );
        drop(calls);
        // Without a handler nothing breaks.
        let mut quiet = PciConfigMmio::new(f.root.clone(), 256, None);
        quiet.write(ecam(2, 3, 4, 0x04), &[0, 0]);
        assert!(f.probe.lock().unwrap().decoded_bars().is_empty());
    }

    #[test]
    fn removed_device_reads_all_ones() {
        let mut f = fixture();
        f.root
            .lock()
            .unwrap()
            .remove_downstream_device(bdf(0, 0x1f, 0), bdf(2, 3, 4).devfn());
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 4, 0)), u32::MAX);
        let mut b = [0u8; 4];
        f.ecam.read(ecam(2, 3, 4, 0), &mut b);
        assert_eq!(b, [0xff; 4]);
        f.ecam.write(ecam(2, 3, 4, 0x3c), &[1]);
        assert!(f.probe.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn any_access_anywhere_never_panics() {
        let mut f = fixture();
        let mut data = [0u8; 8];
        // Every CF8 port offset (and past it), every length, with the address register both
        // pointing at a device and disabled.
        for address in [cf8(2, 3, 4, 0x10), cf8(0, 0, 0, 0xfc), 0, u32::MAX] {
            for offset in 0..16u16 {
                for len in 0..=8usize {
                    f.io.write(0, &address.to_le_bytes());
                    f.io.read(offset, &mut data[..len]);
                    if offset >= 8 || (offset < 4 && (offset, len) != (0, 4)) {
                        assert!(data[..len].iter().all(|&b| b == 0xff));
                    }
                    f.io.write(offset, &[0xff; 8][..len]);
                }
            }
        }
        // Every ECAM offset of the probe's function and of an absent one, every length.
        for base in [ecam(2, 3, 4, 0), ecam(0, 0, 0, 0), ecam(7, 0, 1, 0)] {
            for register in 0..(CONFIG_SPACE_SIZE as u64 + 16) {
                for len in 0..=8usize {
                    f.ecam.read(base + register, &mut data[..len]);
                    if register >= CONFIG_SPACE_SIZE as u64 && base != ecam(2, 3, 4, 0) {
                        // Past the function's 4 KiB is the next function (absent here).
                        assert!(data[..len].iter().all(|&b| b == 0xff));
                    }
                    f.ecam.write(base + register, &[0x5a; 8][..len]);
                }
            }
        }
        // Offsets beyond the window, huge offsets.
        for offset in [256 << 20, u64::MAX, u64::MAX - 3] {
            f.ecam.read(offset, &mut data[..4]);
            assert_eq!(data[..4], [0xff; 4]);
            f.ecam.write(offset, &data[..4]);
        }
        f.io.read(u16::MAX, &mut data);
        f.io.write(u16::MAX, &data);
        // The probe is still sane.
        assert_eq!(io_read32(&mut f.io, cf8(2, 3, 4, 0)), 0x1042_1af4);
    }

    #[test]
    fn registered_on_an_io_manager() {
        let f = fixture();
        let mut manager = IoManager::new();
        let io = Arc::new(Mutex::new(f.io));
        let ecam_window = Arc::new(Mutex::new(f.ecam));
        let ecam_base = 0xb000_0000u64;
        manager
            .register_pio(
                PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_COUNT).unwrap(),
                io,
            )
            .unwrap();
        let size = ecam_window.lock().unwrap().size();
        manager
            .register_mmio(
                MmioRange::new(MmioAddress(ecam_base), size).unwrap(),
                ecam_window,
            )
            .unwrap();
        manager
            .pio_write(PioAddress(0xcf8), &cf8(2, 3, 4, 0).to_le_bytes())
            .unwrap();
        let mut w = [0u8; 2];
        manager.pio_read(PioAddress(0xcfe), &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        let mut d = [0u8; 4];
        manager
            .mmio_read(MmioAddress(ecam_base + ecam(0, 0, 0, 0)), &mut d)
            .unwrap();
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
    }

    fn vendor_at(f: &Fixture, b: Bdf) -> u16 {
        let mut id = [0u8; 2];
        f.root.lock().unwrap().config_read(b, 0, &mut id);
        u16::from_le_bytes(id)
    }

    #[test]
    fn functions_below_a_bridge_follow_its_bus_number_and_link() {
        let f = fixture();
        assert_eq!(vendor_at(&f, bdf(2, 3, 4)), 0x1af4);
        // Other functions on bus 2 and other buses are empty.
        assert_eq!(vendor_at(&f, bdf(2, 3, 5)), 0xffff);
        assert_eq!(vendor_at(&f, bdf(3, 3, 4)), 0xffff);
        // The guest renumbers the bus: the function moves with it.
        f.bridge.lock().unwrap().bus = Some(7);
        assert_eq!(vendor_at(&f, bdf(2, 3, 4)), 0xffff);
        assert_eq!(vendor_at(&f, bdf(7, 3, 4)), 0x1af4);
        // Link down (or bus not numbered): nothing answers, writes go nowhere.
        f.bridge.lock().unwrap().bus = None;
        assert_eq!(vendor_at(&f, bdf(7, 3, 4)), 0xffff);
        let before = f.probe.lock().unwrap().writes.len();
        let _ = f.root.lock().unwrap().config_write(bdf(7, 3, 4), 4, &[6]);
        assert_eq!(f.probe.lock().unwrap().writes.len(), before);
        // The device is still there for the VMM.
        let root = f.root.lock().unwrap();
        assert!(root
            .downstream_device(bdf(0, 0x1f, 0), bdf(2, 3, 4).devfn())
            .is_some());
        assert_eq!(root.downstream_devices().count(), 1);
    }

    #[test]
    fn downstream_devices_need_a_bridge_and_a_free_address() {
        let f = fixture();
        let mut root = f.root.lock().unwrap();
        let dev = Arc::new(Mutex::new(Probe::new(1)));
        assert_eq!(
            root.add_downstream_device(bdf(0, 9, 0), 0, dev.clone()),
            Err(PciBusError::NoSuchBridge(bdf(0, 9, 0)))
        );
        assert!(matches!(
            root.add_downstream_device(bdf(0, 0x1f, 0), bdf(2, 3, 4).devfn(), dev.clone()),
            Err(PciBusError::AddressInUse(_))
        ));
        assert_eq!(
            root.add_device(bdf(1, 0, 0), dev.clone()),
            Err(PciBusError::NotOnRootBus(bdf(1, 0, 0)))
        );
        assert!(root
            .remove_downstream_device(bdf(0, 0x1f, 0), bdf(2, 3, 4).devfn())
            .is_some());
        assert!(root.device(bdf(2, 3, 4)).is_none());
        root.add_downstream_device(bdf(0, 0x1f, 0), 0, dev).unwrap();
        assert!(root.device(bdf(2, 0, 0)).is_some());
    }
}
