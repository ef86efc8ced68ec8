//! The PCI devices of the machine and the KVM plumbing they need: BAR mappings (a [`BarSpace`]
//! over the host bridge's windows), ioeventfds on virtio notify addresses that follow BAR moves,
//! MSI-X vectors on irqfds, and MMIO address allocation for BARs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::{
    BarReprogram, BarReprogrammingHandler, BarSpace, Bdf, PciDevice, PciRoot, PcieRootPort,
    RootPortOptions, SharedPciDevice,
};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::GuestMemory;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::interrupts::{GsiRouter, KvmMsiGroup, KvmMsiSink};

/// Device number of root port rp0 on bus 0; rpN is at FIRST_ROOT_PORT_SLOT + N.
pub const FIRST_ROOT_PORT_SLOT: u8 = 0x10;

/// A virtio-pci function and the notify addresses its ioeventfds are registered on now.
struct VirtioFunction {
    device: Arc<Mutex<VirtioPciDevice>>,
    /// The disk's id and backing file, for query-block.
    id: String,
    path: std::path::PathBuf,
    readonly: bool,
    /// Where BAR 0 is decoded (and the ioeventfds registered), if it is.
    bar0: Option<u64>,
    bar0_range: RangeInclusive,
}

/// A root port of the machine: where it is and the device.
struct RootPortEntry {
    bdf: Bdf,
    port: Arc<Mutex<PcieRootPort>>,
}

/// The PCI devices of one segment.
pub struct PciDevices {
    vm: Arc<VmFd>,
    memory: GuestMemory,
    root: Arc<Mutex<PciRoot>>,
    bars: Arc<BarSpace>,
    router: Arc<GsiRouter>,
    mmio: Mutex<AddressAllocator>,
    virtio: Mutex<BTreeMap<Bdf, VirtioFunction>>,
    /// Root ports by id; hot-add and removal go through their slots.
    root_ports: Mutex<BTreeMap<String, RootPortEntry>>,
    queues_per_disk: u16,
}

/// A failure to add a device.
#[derive(Debug, thiserror::Error)]
pub enum AddDeviceError {
    #[error("{0}")]
    Block(#[from] devices::virtio::block::BlockError),
    #[error("virtio-pci: {0}")]
    Transport(String),
    #[error("no MMIO space left for {0}'s BAR")]
    NoMmio(String),
    #[error("interrupts for {0}: {1}")]
    Interrupts(String, std::io::Error),
    #[error("{0}")]
    Bus(String),
}

impl PciDevices {
    /// Devices on `root`, BARs allocated from `[mmio_base, mmio_base + mmio_size)`.
    pub fn new(
        vm: Arc<VmFd>,
        memory: GuestMemory,
        root: Arc<Mutex<PciRoot>>,
        bars: Arc<BarSpace>,
        router: Arc<GsiRouter>,
        (mmio_base, mmio_size): (u64, u64),
        queues_per_disk: u16,
    ) -> Result<Self, AddDeviceError> {
        let mmio = AddressAllocator::new(mmio_base, mmio_size)
            .map_err(|e| AddDeviceError::Bus(format!("MMIO window: {e}")))?;
        Ok(PciDevices {
            vm,
            memory,
            root,
            bars,
            router,
            mmio: Mutex::new(mmio),
            virtio: Mutex::new(BTreeMap::new()),
            root_ports: Mutex::new(BTreeMap::new()),
            queues_per_disk,
        })
    }

    /// Adds a virtio-blk disk at `bdf`, its BAR 0 assigned (the guest may move it).
    pub fn add_disk(
        &self,
        bdf: Bdf,
        id: &str,
        path: &std::path::Path,
        readonly: bool,
    ) -> Result<(), AddDeviceError> {
        let mut config = BlockConfig::new(path, id);
        config.readonly = readonly;
        config.num_queues = self.queues_per_disk.max(1);
        let block = Block::new(config)?;
        let vectors = VirtioPciDevice::msix_vector_count(&block);
        let msi = KvmMsiGroup::new(self.router.clone(), vectors)
            .map_err(|e| AddDeviceError::Interrupts(id.to_string(), e))?;
        let mut dev = VirtioPciDevice::new(Box::new(block), self.memory.clone(), Arc::new(msi))
            .map_err(|e| AddDeviceError::Transport(format!("{id}: {e}")))?;
        let bar = dev
            .config()
            .bar(0)
            .ok_or_else(|| AddDeviceError::Transport(format!("{id}: no BAR 0")))?;
        let range = lock(&self.mmio)
            .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
            .map_err(|_| AddDeviceError::NoMmio(id.to_string()))?;
        dev.config_mut()
            .set_bar_address(0, range.start())
            .map_err(|e| AddDeviceError::Transport(format!("{id}: {e}")))?;
        let dev = Arc::new(Mutex::new(dev));
        let shared: SharedPciDevice = dev.clone();
        if let Err(e) = lock(&self.root).add_device(bdf, shared) {
            let _ = lock(&self.mmio).free(&range);
            return Err(AddDeviceError::Bus(format!("{bdf}: {e}")));
        }
        lock(&self.virtio).insert(
            bdf,
            VirtioFunction {
                device: dev,
                id: id.to_string(),
                path: path.to_path_buf(),
                readonly,
                bar0: None,
                bar0_range: range,
            },
        );
        log::info!("{bdf}: virtio-blk {id} ({})", path.display());
        Ok(())
    }

    /// Adds PCI Express root port `id` (e.g. "rp0") with native hot-plug at `bdf`; its slot's
    /// Physical Slot Number is `slot_number`.
    pub fn add_root_port(
        &self,
        bdf: Bdf,
        id: &str,
        slot_number: u16,
    ) -> Result<(), AddDeviceError> {
        let msi = KvmMsiGroup::new(self.router.clone(), 1)
            .map_err(|e| AddDeviceError::Interrupts(id.to_string(), e))?;
        let options = RootPortOptions {
            port_number: u8::try_from(slot_number).unwrap_or(0),
            ..RootPortOptions::default()
        };
        let port = Arc::new(Mutex::new(PcieRootPort::new(
            id,
            slot_number,
            options,
            Arc::new(KvmMsiSink(msi)),
        )));
        let shared: SharedPciDevice = port.clone();
        lock(&self.root)
            .add_device(bdf, shared)
            .map_err(|e| AddDeviceError::Bus(format!("{bdf}: {e}")))?;
        lock(&self.root_ports).insert(id.to_string(), RootPortEntry { bdf, port });
        log::info!("{bdf}: PCIe root port {id} (slot {slot_number}, native hot-plug)");
        Ok(())
    }

    fn move_ioeventfds(&self, f: &mut VirtioFunction, new: Option<u64>) {
        if f.bar0 == new {
            return;
        }
        let dev = lock(&f.device);
        if let Some(old) = f.bar0.take() {
            for (addr, _len, evt) in dev.ioeventfds(old) {
                if let Err(e) =
                    self.vm
                        .unregister_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                {
                    log::warn!("{}: unregistering ioeventfd at {addr:#x}: {e}", dev.id());
                }
            }
        }
        if let Some(base) = new {
            for (addr, _len, evt) in dev.ioeventfds(base) {
                if let Err(e) =
                    self.vm
                        .register_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                {
                    // The notify write still reaches the device through the BAR: slower, correct.
                    log::warn!("{}: registering ioeventfd at {addr:#x}: {e}", dev.id());
                }
            }
            f.bar0 = Some(base);
        }
    }

    /// QMP `query-pci`: the functions of bus 0 in QEMU's format (the subset clients use).
    pub fn query_pci(&self) -> serde_json::Value {
        let devices: Vec<(Bdf, SharedPciDevice)> = lock(&self.root)
            .devices()
            .map(|(bdf, d)| (bdf, d.clone()))
            .collect();
        let mut out = Vec::new();
        for (bdf, dev) in devices {
            let mut id = [0u8; 4];
            let mut class = [0u8; 4];
            let qdev_id = {
                let mut d = lock(&dev);
                d.config_read(0, &mut id);
                d.config_read(8, &mut class);
                d.id().to_string()
            };
            out.push(serde_json::json!({
                "bus": bdf.bus(),
                "slot": bdf.device(),
                "function": bdf.function(),
                "class_info": {"class": u16::from_le_bytes([class[2], class[3]])},
                "id": {
                    "vendor": u16::from_le_bytes([id[0], id[1]]),
                    "device": u16::from_le_bytes([id[2], id[3]]),
                },
                "qdev_id": qdev_id,
            }));
        }
        serde_json::json!([{"bus": 0, "devices": out}])
    }

    /// QMP `query-block`: every disk with its backing file.
    pub fn query_block(&self) -> serde_json::Value {
        let virtio = lock(&self.virtio);
        let disks: Vec<serde_json::Value> = virtio
            .values()
            .map(|f| {
                serde_json::json!({
                    "device": "",
                    "qdev": f.id,
                    "locked": false,
                    "removable": false,
                    "type": "unknown",
                    "inserted": {
                        "node-name": f.id,
                        "file": f.path.display().to_string(),
                        "ro": f.readonly,
                        "drv": "raw",
                    },
                })
            })
            .collect();
        serde_json::Value::Array(disks)
    }

    /// Removes every device (at exit): stops their I/O threads and releases their backends.
    pub fn shutdown(&self) {
        let mut virtio = lock(&self.virtio);
        for (bdf, mut f) in std::mem::take(&mut *virtio) {
            self.move_ioeventfds(&mut f, None);
            self.bars.unmap_all(bdf);
            lock(&f.device).shutdown();
            let _ = lock(&self.root).remove_device(bdf);
            let _ = lock(&self.mmio).free(&f.bar0_range);
        }
        for (id, e) in std::mem::take(&mut *lock(&self.root_ports)) {
            let present = lock(&e.port).slot().is_present();
            log::debug!(
                "{}: root port {id} removed (card present: {present})",
                e.bdf
            );
            let _ = lock(&self.root).remove_device(e.bdf);
        }
    }
}

impl BarReprogrammingHandler for PciDevices {
    fn reprogram_bars(&self, bdf: Bdf, device: &SharedPciDevice, changes: &[BarReprogram]) {
        self.bars.reprogram_bars(bdf, device, changes);
        let mut virtio = lock(&self.virtio);
        if let Some(f) = virtio.get_mut(&bdf) {
            for c in changes.iter().filter(|c| c.index == 0) {
                self.move_ioeventfds(f, c.new);
            }
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
