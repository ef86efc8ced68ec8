//! The modern virtio-pci transport (Virtio 1.2 §4.1): a [`VirtioDevice`] as a non-transitional
//! ("virtio 1.x only") PCI function.
//!
//! # What the guest sees
//!
//! - Vendor 0x1af4, device 0x1040 + the virtio device ID, revision 1 (§4.1.2); subsystem
//!   1af4:1100 as QEMU's modern-only devices have (§4.1.2.1 only asks for a subsystem device ID of
//!   0x40 or more); the class code QEMU uses for the device type (e.g. 01/00/00 for block, like
//!   `virtio-blk-pci`).
//! - Interrupt Pin 0: no INTx. Interrupts are MSI-X only, with one vector per queue plus one for
//!   configuration changes ([`VirtioPciDevice::msix_vector_count`]). The ISR status register is
//!   still implemented (§4.1.4.5): the configuration bit is set on every configuration
//!   interrupt, the queue bit when a queue interrupt could not be sent as MSI-X.
//! - One 64-bit non-prefetchable memory BAR, BAR 0, of [`BAR0_SIZE`] bytes:
//!
//!   | offset                   | contents                                          | capability |
//!   | ------------------------ | ------------------------------------------------- | ---------- |
//!   | [`COMMON_CFG_OFFSET`]    | common configuration, §4.1.4.3                    | type 1     |
//!   | [`ISR_CFG_OFFSET`]       | ISR status, §4.1.4.5                              | type 3     |
//!   | [`DEVICE_CFG_OFFSET`]    | device-specific configuration, §4.1.4.6           | type 4     |
//!   | [`NOTIFY_CFG_OFFSET`]    | queue notify addresses, 4 bytes apart, §4.1.4.4   | type 2     |
//!   | [`MSIX_TABLE_OFFSET`]    | MSI-X table                                       | MSI-X      |
//!   | [`MSIX_PBA_OFFSET`]      | MSI-X Pending Bit Array                           | MSI-X      |
//!
//! - Vendor-specific capabilities (`struct virtio_pci_cap`, §4.1.4) for the four regions, the
//!   `VIRTIO_PCI_CAP_PCI_CFG` access window (§4.1.4.9) and the MSI-X capability.
//!
//! The transport offers the device's features minus those it cannot honour (packed rings,
//! notification data, ring reset, …; see [`TRANSPORT_UNSUPPORTED_FEATURES`]) and always offers
//! VIRTIO_F_VERSION_1. Queues are split virtqueues (`virtio-queue`'s [`Queue`]).
//!
//! # Access sizes
//!
//! The common configuration is served field by field, at the width the spec gives each field
//! (§4.1.3.1); 64-bit fields also as two aligned 32-bit halves or one aligned 64-bit access. Any
//! other access to it reads zero and is ignored when written. The ISR register reads (and
//! clears) at its first byte with any width. Device-specific configuration accesses of any size
//! go to the device. A write of any size at the start of a queue's notify address notifies the
//! queue. MSI-X accesses are as [`Msix`] documents. An access is dispatched by its first byte:
//! one that runs past its region never reaches the next one. Reserved space in BAR 0 reads zero;
//! beyond BAR 0 (and other BARs) reads all-ones.
//!
//! # What the VMM does
//!
//! - Builds the device with [`VirtioPciDevice::new`], giving it an [`MsiInterruptGroup`] of
//!   [`VirtioPciDevice::msix_vector_count`] vectors.
//! - Maps BAR 0 ([`PciBarIo`](crate::pci::PciBarIo)) where [`PciDevice::decoded_bars`] and the
//!   [`BarReprogram`](crate::pci::BarReprogram)s of configuration writes say, and registers each
//!   `(address, length, event)` of [`VirtioPciDevice::ioeventfds`] as an ioeventfd — unregistering
//!   them at the old address and registering again whenever BAR 0 moves or stops being decoded.
//!   Without ioeventfds, guest writes to the notify addresses reach
//!   [`PciDevice::bar_write`], which signals the same events.
//! - Keeps each MSI-X vector's route in step with [`MsiInterruptGroup::update`].
//!
//! Bus Master Enable is not checked before sending MSI-X messages or touching guest memory.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use serde::{Deserialize, Serialize};

use super::{
    features, read_le16, status, used_event_address, ActiveQueue, GuestMemory, InFlightOutcome,
    InFlightPolicy, QueueProgress, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VIRTIO_MSI_NO_VECTOR,
};
use crate::interrupt::MsiInterruptGroup;
use crate::pci::configuration::PciConfigurationState;
use crate::pci::configuration::{
    BarKind, BarRegion, PciConfigError, PciConfiguration, PciIdentity, CAP_ID_MSIX,
    CAP_ID_VENDOR_SPECIFIC,
};
use crate::pci::device::{ConfigWriteResult, PciDevice};
use crate::pci::msix::{
    Msix, MsixCapability, MsixDelivery, MsixError, MsixState, MSIX_CAP_LEN,
    MSIX_CAP_MESSAGE_CONTROL,
};
use crate::state::{expect_same, StateError};

// ---- Identity (Virtio 1.2 §4.1.2) ----

/// PCI vendor ID of every virtio device. §4.1.2.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device ID of a modern device: this plus the virtio device ID. §4.1.2.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision ID of a non-transitional device (1 or more). §4.1.2.1.
pub const VIRTIO_PCI_REVISION_ID: u8 = 1;
/// Subsystem vendor ID: Red Hat/Qumranet, as QEMU.
pub const VIRTIO_PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem ID: QEMU's default (0x40 or more for a non-transitional device, §4.1.2.1).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

/// Virtio device ID of a network card (§5.1).
pub const VIRTIO_ID_NET: u32 = 1;
/// Virtio device ID of a block device (§5.2).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device ID of a console (§5.3).
pub const VIRTIO_ID_CONSOLE: u32 = 3;

// ---- struct virtio_pci_cap (Virtio 1.2 §4.1.4) ----

/// `cfg_type` of the common configuration capability. §4.1.4.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// `cfg_type` of the notifications capability. §4.1.4.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `cfg_type` of the ISR status capability. §4.1.4.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// `cfg_type` of the device-specific configuration capability. §4.1.4.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// `cfg_type` of the PCI configuration access capability. §4.1.4.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// `cap_len` field of `virtio_pci_cap`. §4.1.4.
pub const VIRTIO_CAP_LEN: u16 = 2;
/// `cfg_type` field. §4.1.4.
pub const VIRTIO_CAP_CFG_TYPE: u16 = 3;
/// `bar` field. §4.1.4.
pub const VIRTIO_CAP_BAR: u16 = 4;
/// `id` field. §4.1.4.
pub const VIRTIO_CAP_ID: u16 = 5;
/// `offset` field (32 bits). §4.1.4.
pub const VIRTIO_CAP_OFFSET: u16 = 8;
/// `length` field (32 bits). §4.1.4.
pub const VIRTIO_CAP_LENGTH: u16 = 12;
/// Size of `struct virtio_pci_cap`. §4.1.4.
pub const VIRTIO_CAP_SIZE: usize = 16;
/// `notify_off_multiplier` of `struct virtio_pci_notify_cap` (32 bits). §4.1.4.4.
pub const VIRTIO_NOTIFY_CAP_MULTIPLIER: u16 = 16;
/// `pci_cfg_data` of `struct virtio_pci_cfg_cap` (4 bytes). §4.1.4.9.
pub const VIRTIO_PCI_CFG_CAP_DATA: u16 = 16;

// ---- BAR 0 layout (this implementation's choice) ----

/// BAR holding every virtio structure and the MSI-X table and PBA.
pub const VIRTIO_BAR: usize = 0;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Common configuration in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration: `struct virtio_pci_common_cfg` without the optional
/// `queue_notify_data`/`queue_reset` fields (§4.1.4.3).
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// ISR status in BAR 0.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Length of the ISR status (one byte). §4.1.4.5.
pub const ISR_CFG_SIZE: u64 = 1;
/// Device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device-specific configuration window (reads past the device's own structure
/// return zeros).
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Queue notify addresses in BAR 0: queue `n` at `NOTIFY_CFG_OFFSET + n * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Size of the notify region.
pub const NOTIFY_CFG_REGION: u64 = 0x1000;
/// `notify_off_multiplier`: bytes between two queues' notify addresses. §4.1.4.4.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Length of a notify write the VMM should match with an ioeventfd (the driver writes the
/// 16-bit queue index without VIRTIO_F_NOTIFICATION_DATA, §4.1.5.2).
pub const NOTIFY_WRITE_LEN: u32 = 2;
/// MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// End of the PBA region (the rest of BAR 0 is reserved).
pub const MSIX_PBA_END: u64 = 0x7000;
/// Most queues a device may have: one MSI-X vector each plus one for configuration must fit the
/// table region (16 bytes per vector).
pub const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize - 1;

// The regions of BAR 0 are in order, do not overlap, and have room for MAX_QUEUES queues.
const _: () = {
    assert!(COMMON_CFG_OFFSET + COMMON_CFG_SIZE <= ISR_CFG_OFFSET);
    assert!(ISR_CFG_OFFSET + ISR_CFG_SIZE <= DEVICE_CFG_OFFSET);
    assert!(DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE <= NOTIFY_CFG_OFFSET);
    assert!(NOTIFY_CFG_OFFSET + NOTIFY_CFG_REGION <= MSIX_TABLE_OFFSET);
    assert!(MAX_QUEUES as u64 * NOTIFY_OFF_MULTIPLIER as u64 <= NOTIFY_CFG_REGION);
    assert!(MSIX_TABLE_OFFSET + (MAX_QUEUES as u64 + 1) * 16 <= MSIX_PBA_OFFSET);
    assert!(MSIX_PBA_OFFSET + (MAX_QUEUES as u64 + 1).div_ceil(64) * 8 <= MSIX_PBA_END);
    assert!(MSIX_PBA_END <= BAR0_SIZE);
};

// ---- Common configuration, struct virtio_pci_common_cfg (Virtio 1.2 §4.1.4.3) ----

/// `device_feature_select` (le32, RW). §4.1.4.3.
pub const COMMON_DEVICE_FEATURE_SELECT: u64 = 0x00;
/// `device_feature` (le32, RO). §4.1.4.3.
pub const COMMON_DEVICE_FEATURE: u64 = 0x04;
/// `driver_feature_select` (le32, RW). §4.1.4.3.
pub const COMMON_DRIVER_FEATURE_SELECT: u64 = 0x08;
/// `driver_feature` (le32, RW). §4.1.4.3.
pub const COMMON_DRIVER_FEATURE: u64 = 0x0c;
/// `config_msix_vector` (le16, RW). §4.1.4.3.
pub const COMMON_CONFIG_MSIX_VECTOR: u64 = 0x10;
/// `num_queues` (le16, RO). §4.1.4.3.
pub const COMMON_NUM_QUEUES: u64 = 0x12;
/// `device_status` (u8, RW). §4.1.4.3.
pub const COMMON_DEVICE_STATUS: u64 = 0x14;
/// `config_generation` (u8, RO). §4.1.4.3.
pub const COMMON_CONFIG_GENERATION: u64 = 0x15;
/// `queue_select` (le16, RW). §4.1.4.3.
pub const COMMON_QUEUE_SELECT: u64 = 0x16;
/// `queue_size` (le16, RW). §4.1.4.3.
pub const COMMON_QUEUE_SIZE: u64 = 0x18;
/// `queue_msix_vector` (le16, RW). §4.1.4.3.
pub const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
/// `queue_enable` (le16, RW). §4.1.4.3.
pub const COMMON_QUEUE_ENABLE: u64 = 0x1c;
/// `queue_notify_off` (le16, RO). §4.1.4.3.
pub const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;
/// `queue_desc` (le64, RW). §4.1.4.3.
pub const COMMON_QUEUE_DESC: u64 = 0x20;
/// `queue_driver`, the available ring (le64, RW). §4.1.4.3.
pub const COMMON_QUEUE_DRIVER: u64 = 0x28;
/// `queue_device`, the used ring (le64, RW). §4.1.4.3.
pub const COMMON_QUEUE_DEVICE: u64 = 0x30;

// ---- ISR status bits (Virtio 1.2 §4.1.4.5) ----

/// ISR bit 0: queue interrupt.
pub const ISR_QUEUE: u8 = 1 << 0;
/// ISR bit 1: device configuration interrupt.
pub const ISR_CONFIG: u8 = 1 << 1;

// ---- Features ----

/// VIRTIO_F_ACCESS_PLATFORM (§6): the device would sit behind an IOMMU. Not offered.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// VIRTIO_F_RING_PACKED (§6): packed virtqueues. Not offered (split queues only).
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// VIRTIO_F_SR_IOV (§6). Not offered.
pub const VIRTIO_F_SR_IOV: u32 = 37;
/// VIRTIO_F_NOTIFICATION_DATA (§6). Not offered.
pub const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;
/// VIRTIO_F_NOTIF_CONFIG_DATA (§6): `queue_notify_data`. Not offered.
pub const VIRTIO_F_NOTIF_CONFIG_DATA: u32 = 39;
/// VIRTIO_F_RING_RESET (§6): `queue_reset`. Not offered.
pub const VIRTIO_F_RING_RESET: u32 = 40;
/// VIRTIO_F_ADMIN_VQ (§6). Not offered.
pub const VIRTIO_F_ADMIN_VQ: u32 = 41;
/// Feature bits this transport never offers, whatever the device says.
pub const TRANSPORT_UNSUPPORTED_FEATURES: u64 = (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_SR_IOV)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | (1 << VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << VIRTIO_F_RING_RESET)
    | (1 << VIRTIO_F_ADMIN_VQ);

/// Status bits the driver may set (DEVICE_NEEDS_RESET is the device's).
const DRIVER_STATUS_BITS: u8 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;

/// Base class, sub-class and programming interface QEMU gives a virtio device type
/// (`hw/virtio/virtio-*-pci.c`); 0xff ("unassigned class") for the rest.
pub fn virtio_pci_class(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        VIRTIO_ID_NET => (0x02, 0x00, 0x00),     // network, Ethernet
        VIRTIO_ID_BLOCK => (0x01, 0x00, 0x00),   // mass storage, SCSI (PCI_CLASS_STORAGE_SCSI)
        VIRTIO_ID_CONSOLE => (0x07, 0x80, 0x00), // communication, other
        _ => (0xff, 0x00, 0x00),
    }
}

/// Errors in building a [`VirtioPciDevice`].
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device has more queues than BAR 0 has room for.
    #[error("virtio device has {0} queues, at most {MAX_QUEUES} are supported")]
    TooManyQueues(usize),
    /// The device type does not fit the PCI device ID.
    #[error("virtio device type {0} cannot be a PCI device ID")]
    DeviceType(u32),
    /// Building the configuration space failed (a bug).
    #[error("PCI configuration: {0}")]
    Config(#[from] PciConfigError),
    /// Building the MSI-X model failed (a bug).
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    /// Creating a queue notification event failed.
    #[error("creating a queue notification eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// The interrupt state shared between the transport (vCPU thread) and the device (its I/O
/// thread): the vectors the driver chose, the ISR status and the configuration generation.
struct Interrupts {
    msix: Msix,
    isr: AtomicU8,
    config_generation: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
}

impl Interrupts {
    fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    fn send(&self, vector: u16) -> io::Result<MsixDelivery> {
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(MsixDelivery::NoSuchVector);
        }
        self.msix.trigger(vector)
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_generation.store(0, Ordering::Release);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.msix.clear_pending();
    }
}

impl VirtioInterrupt for Interrupts {
    /// Configuration: bumps `config_generation`, sets the ISR configuration bit and sends
    /// `config_msix_vector` (§4.1.4.5.1, §4.1.5.1.2). Queue `n`: sends `queue_msix_vector` of
    /// queue `n`, or sets the ISR queue bit when no MSI-X message can go out.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        match kind {
            VirtioInterruptType::Config => {
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
                self.send(self.config_vector.load(Ordering::Acquire))?;
            }
            VirtioInterruptType::Queue(n) => match self.send(self.queue_vector(n))? {
                MsixDelivery::Sent | MsixDelivery::Pending => {}
                MsixDelivery::Disabled | MsixDelivery::NoSuchVector => {
                    self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
                }
            },
        }
        Ok(())
    }
}

/// What the driver configured for one queue (§4.1.4.3), kept raw until DRIVER_OK.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    /// 0 if the queue is unavailable.
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// The `virtio-queue` queue the driver described, if it is usable on `memory`.
    fn build(&self, features: u64, memory: &GuestMemory) -> Result<Queue, String> {
        let mut queue = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        queue.try_set_size(self.size).map_err(|e| e.to_string())?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|e| e.to_string())?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|e| e.to_string())?;
        queue.set_event_idx(features & (1 << features::VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(&*memory.memory()) {
            return Err("rings are outside guest memory".into());
        }
        Ok(queue)
    }
}

/// Which 64-bit queue address field an access hits, and which part of it.
#[derive(Clone, Copy)]
enum AddressPart {
    Whole,
    Low,
    High,
}

fn queue_address_field(offset: u64, len: usize) -> Option<(usize, AddressPart)> {
    let field = match offset & !7 {
        COMMON_QUEUE_DESC => 0,
        COMMON_QUEUE_DRIVER => 1,
        COMMON_QUEUE_DEVICE => 2,
        _ => return None,
    };
    let part = match (offset % 8, len) {
        (0, 8) => AddressPart::Whole,
        (0, 4) => AddressPart::Low,
        (4, 4) => AddressPart::High,
        _ => return None,
    };
    Some((field, part))
}

/// `[a, a + a_len)` and `[b, b + b_len)` overlap.
fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// `struct virtio_pci_cap` (or a longer one with `extra` after it) for a structure in BAR 0,
/// header bytes left for the configuration space to fill in.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![0u8; VIRTIO_CAP_SIZE];
    cap[usize::from(VIRTIO_CAP_LEN)] = (VIRTIO_CAP_SIZE + extra.len()) as u8;
    cap[usize::from(VIRTIO_CAP_CFG_TYPE)] = cfg_type;
    cap[usize::from(VIRTIO_CAP_BAR)] = VIRTIO_BAR as u8;
    // Offsets and lengths in BAR 0 are below BAR0_SIZE.
    cap[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    cap[12..16].copy_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

/// Where one enabled queue's rings stand, read from guest memory (§2.7.6, §2.7.8): how far
/// the driver made chains available, how far the device used them, and how far the driver says
/// it has taken the used ones (`used_event`, §2.7.10, with `VIRTIO_RING_F_EVENT_IDX`). `used` ahead
/// of `used_event` while the driver waits on its requests means it never took a completion
/// the device published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RingIndices {
    /// The queue's index.
    pub index: u16,
    /// The available ring's `idx`.
    pub avail: u16,
    /// The used ring's `idx`.
    pub used: u16,
    /// The available ring's `used_event` (`None` without `VIRTIO_RING_F_EVENT_IDX`). Linux
    /// writes 0 there while it takes completions, and the index it took up to when it
    /// re-enables its callback.
    pub used_event: Option<u16>,
}

/// One queue's registers in the saved state of a [`VirtioPciDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    /// `queue_size` as the device offers it (0: the queue is unavailable).
    pub max_size: u16,
    /// `queue_size` as the driver set it.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// `queue_desc`.
    pub desc: u64,
    /// `queue_driver`.
    pub driver: u64,
    /// `queue_device`.
    pub device: u64,
    /// `queue_msix_vector`.
    pub msix_vector: u16,
}

/// The saved state of a [`VirtioPciDevice`]: everything the driver set through the transport
/// and where the device left each active queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Configuration space.
    pub config: PciConfigurationState,
    /// MSI-X table, PBA and enables.
    pub msix: MsixState,
    /// The features the transport offered (checked against the restored function's).
    pub device_features: u64,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// `driver_feature`, both halves.
    pub driver_features: u64,
    /// `device_status` as the driver set it (DEVICE_NEEDS_RESET included if the transport set
    /// it).
    pub status: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// Every queue's registers.
    pub queues: Vec<QueueRegisters>,
    /// The ISR status bits not read yet.
    pub isr: u8,
    /// `config_generation`.
    pub config_generation: u8,
    /// `config_msix_vector`.
    pub config_msix_vector: u16,
    /// DRIVER_OK was accepted and the device activated.
    pub activated: bool,
    /// The device hit an error it cannot recover from without a reset.
    pub needs_reset: bool,
    /// Pulled out by surprise; with `activated`, it still fails every request.
    pub pulled: bool,
    /// Where the device left each active queue.
    pub progress: Vec<QueueProgress>,
}

/// A [`VirtioDevice`] behind the modern virtio-pci transport. See the module documentation.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap: u16,
    pci_cfg_cap: u16,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemory,
    interrupts: Arc<Interrupts>,
    /// What the transport offers: the device's features, cleaned up.
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    notify: Vec<Arc<EventFd>>,
    /// `activate` was called since the last reset (whether or not it succeeded).
    activated: bool,
    /// Pulled out by surprise ([`surprise_remove`](Self::surprise_remove)): the function is
    /// gone for the guest; a BAR access that still reaches it reads zero, and of the writes
    /// only the driver's reset has an effect.
    pulled: bool,
    /// Paused ([`pause`](Self::pause)): where the device left its active queues.
    paused: Option<Vec<QueueProgress>>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("id", &self.device.id())
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("activated", &self.activated)
            .field("pulled", &self.pulled)
            .finish_non_exhaustive()
    }
}

impl VirtioPciDevice {
    /// How many MSI-X vectors a transport for `device` has (one per queue plus one for
    /// configuration changes): the size of the [`MsiInterruptGroup`] to give [`Self::new`].
    pub fn msix_vector_count(device: &dyn VirtioDevice) -> u16 {
        let queues = device.queue_max_sizes().len().min(MAX_QUEUES);
        // At most MAX_QUEUES + 1 = 512.
        (queues + 1) as u16
    }

    /// `device` as a virtio-pci function reading and writing `memory` and sending MSI-X messages
    /// through `msi`, which must have [`Self::msix_vector_count`] vectors. BAR 0 starts at address
    /// 0, not decoded; every status is as after a reset.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        msi: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(max_sizes.len()));
        }
        let device_type = device.device_type();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(VirtioPciError::DeviceType(device_type))?;
        let (class_code, subclass, prog_if) = virtio_pci_class(device_type);
        let identity = PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: VIRTIO_PCI_REVISION_ID,
            class_code,
            subclass,
            prog_if,
            multifunction: false,
        };
        let mut config = PciConfiguration::new_type0(
            &identity,
            VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
            VIRTIO_PCI_SUBSYSTEM_ID,
        );
        config.add_bar(
            VIRTIO_BAR,
            BAR0_SIZE,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )?;

        let queues: Vec<QueueConfig> = max_sizes
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                if Queue::new(max).is_ok() {
                    QueueConfig::new(max)
                } else {
                    log::warn!(
                        "virtio {}: queue {i} has invalid maximum size {max}; unavailable",
                        device.id()
                    );
                    QueueConfig::new(0)
                }
            })
            .collect();
        // Below MAX_QUEUES: fits u64 arithmetic and the notify region.
        let notify_len = (queues.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).max(4);

        config.add_capability(
            CAP_ID_VENDOR_SPECIFIC,
            &virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[],
            ),
        )?;
        config.add_capability(
            CAP_ID_VENDOR_SPECIFIC,
            &virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE, &[]),
        )?;
        config.add_capability(
            CAP_ID_VENDOR_SPECIFIC,
            &virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[],
            ),
        )?;
        config.add_capability(
            CAP_ID_VENDOR_SPECIFIC,
            &virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        // VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9): bar, offset, length and pci_cfg_data are the
        // driver's to write.
        let pci_cfg = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut pci_cfg_writable = vec![0u8; pci_cfg.len()];
        pci_cfg_writable[usize::from(VIRTIO_CAP_BAR)] = 0xff;
        pci_cfg_writable[usize::from(VIRTIO_CAP_OFFSET)..].fill(0xff);
        let pci_cfg_cap = config.add_capability_with_masks(
            CAP_ID_VENDOR_SPECIFIC,
            &pci_cfg,
            &pci_cfg_writable,
            &[],
        )?;

        let vectors = (queues.len() + 1) as u16;
        let msix_body = MsixCapability {
            vectors,
            table_bar: VIRTIO_BAR as u8,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: VIRTIO_BAR as u8,
            pba_offset: MSIX_PBA_OFFSET as u32,
        }
        .body();
        debug_assert_eq!(msix_body.len(), MSIX_CAP_LEN);
        let msix_cap = config.add_capability_with_masks(
            CAP_ID_MSIX,
            &msix_body,
            &MsixCapability::WRITABLE,
            &[],
        )?;

        let interrupts = Arc::new(Interrupts {
            msix: Msix::new(vectors, msi)?,
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: queues
                .iter()
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        });
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VirtioPciError::EventFd)?;
        let device_features = (device.features() & !TRANSPORT_UNSUPPORTED_FEATURES)
            | (1 << features::VIRTIO_F_VERSION_1);

        Ok(VirtioPciDevice {
            config,
            msix_cap,
            pci_cfg_cap,
            device,
            memory,
            interrupts,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            notify,
            activated: false,
            pulled: false,
            paused: None,
        })
    }

    /// Number of MSI-X vectors in this function's table.
    pub fn msix_vectors(&self) -> u16 {
        self.interrupts.msix.vectors()
    }

    /// The queue notification events with the guest physical addresses they belong on when BAR 0
    /// is decoded at `bar0_address`: `(address, length, event)` for each available queue, to
    /// register as ioeventfds (any data, [`NOTIFY_WRITE_LEN`] bytes). Register them when BAR 0
    /// becomes decoded, move them when it moves, drop them when it stops being decoded; they are
    /// the same events for the device's whole life.
    pub fn ioeventfds(&self, bar0_address: u64) -> Vec<(u64, u32, Arc<EventFd>)> {
        self.queues
            .iter()
            .zip(&self.notify)
            .enumerate()
            .filter(|(_, (queue, _))| queue.max_size > 0)
            .filter_map(|(index, (_, event))| {
                let address = bar0_address
                    .checked_add(NOTIFY_CFG_OFFSET)?
                    .checked_add(index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER))?;
                Some((address, NOTIFY_WRITE_LEN, event.clone()))
            })
            .collect()
    }

    /// The configuration space, for inspection.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// The configuration space, e.g. for the VMM to assign BAR 0 at cold plug with
    /// [`PciConfiguration::set_bar_address`].
    pub fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status as the driver reads it (§2.1): what the driver set, plus
    /// DEVICE_NEEDS_RESET when the transport or an activated device
    /// ([`VirtioDevice::needs_reset`]) hit an unrecoverable error.
    pub fn status(&self) -> u8 {
        if self.activated && self.device.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device was activated (DRIVER_OK with valid queues) since the last reset and
    /// does not need a reset.
    pub fn is_activated(&self) -> bool {
        self.activated && self.status() & status::DEVICE_NEEDS_RESET == 0
    }

    /// The device is going away (hot-unplug, graceful or surprise): [`VirtioDevice::shutdown`]
    /// (stop the queues, release the backend), then the transport forgets everything as on a
    /// reset. The guest may still access the function until the VMM unmaps it; it then sees a
    /// reset device.
    pub fn shutdown(&mut self) {
        self.device.shutdown();
        self.activated = false;
        self.reset();
    }

    /// The device is pulled out without the driver's knowledge:
    /// [`VirtioDevice::surprise_remove`] with `in_flight`. The VMM takes the function off the
    /// bus right after. If the device goes on [`failing`](InFlightOutcome::failing) the
    /// driver's requests ([`InFlightPolicy::Fail`]), the transport keeps the queues and the
    /// vectors the driver assigned until the driver resets the device — through a BAR write
    /// that still reaches the transport (see [`is_failing`](Self::is_failing)) or
    /// [`reset`](Self::reset) — so that the device's completions keep reaching the driver
    /// meanwhile; the VMM keeps the queues' notification events (ioeventfds) connected until
    /// then. Until then the BAR's notify addresses and MSI-X table still take the driver's
    /// writes (a vector it masks holds the device's interrupts pending), and every other write
    /// but the reset changes nothing. Otherwise the transport forgets everything at once, as on
    /// a reset.
    pub fn surprise_remove(&mut self, in_flight: InFlightPolicy) -> InFlightOutcome {
        let outcome = self.device.surprise_remove(in_flight);
        self.pulled = true;
        if !outcome.failing {
            self.activated = false;
            self.reset();
        }
        outcome
    }

    /// Where each enabled queue's rings stand ([`RingIndices`]), read from guest memory now;
    /// empty unless the device is activated. For inspection (e.g. of a driver that waits on a
    /// device pulled out by surprise): the device's own thread may move them at any time.
    pub fn ring_indices(&self) -> Vec<RingIndices> {
        if !self.activated {
            return Vec::new();
        }
        let event_idx = self.driver_features & (1 << features::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = self.memory.memory();
        let read = |at: Option<u64>| read_le16(&mem, GuestAddress(at?));
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled && q.max_size > 0)
            .filter_map(|(index, q)| {
                Some(RingIndices {
                    index: index as u16,
                    avail: read(q.driver.checked_add(2))?,
                    used: read(q.device.checked_add(2))?,
                    used_event: used_event_address(q.driver, q.size)
                        .filter(|_| event_idx)
                        .and_then(|at| read_le16(&mem, at)),
                })
            })
            .collect()
    }

    /// Whether the device, pulled out by surprise, still fails every request the driver makes
    /// available: until the driver writes 0 to `device_status` (Linux's virtio-pci does once
    /// its block driver has let go, before it frees the rings) or [`reset`](Self::reset).
    pub fn is_failing(&self) -> bool {
        self.pulled && self.activated
    }

    /// Resets the device as a driver write of 0 to `device_status` does (§2.4, §4.1.4.3.1): the
    /// device stops using guest memory (if it was activated), every negotiated value is
    /// forgotten, MSI-X vector assignments go back to NO_VECTOR. The MSI-X table is PCI state
    /// and stays. The VMM calls this when it takes the device away from the guest (e.g. on
    /// surprise removal).
    pub fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.paused = None;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        self.interrupts.reset();
        for event in &self.notify {
            // Drains a stale notification; EAGAIN when there is none.
            let _ = event.read();
        }
    }

    // ---- Saving and restoring ----

    /// The VM pauses: the device stops serving its queues, finishing and publishing what is in
    /// flight ([`VirtioDevice::pause`]); nothing of the function touches guest memory until
    /// [`resume`](Self::resume). Register accesses still work (the VMM's vCPUs are stopped
    /// anyway). Idempotent.
    pub fn pause(&mut self) {
        if self.paused.is_none() {
            self.paused = Some(if self.activated {
                self.device.pause()
            } else {
                Vec::new()
            });
        }
    }

    /// Serves the queues again after [`pause`](Self::pause) or [`restore`](Self::restore).
    pub fn resume(&mut self) {
        if self.paused.take().is_some() && self.activated {
            if let Err(e) = self.device.resume() {
                self.needs_reset(&e.to_string());
            }
        }
    }

    /// The function's state: configuration space, MSI-X, the common configuration as the
    /// driver left it, and where the device left each queue. The function must be
    /// [paused](Self::pause) (the queues' progress is only known then); refused otherwise.
    pub fn state(&self) -> Result<VirtioPciState, StateError> {
        let progress = self.paused.clone().ok_or_else(|| {
            StateError::new(self.model(), "the device must be paused to be saved")
        })?;
        let i = &self.interrupts;
        Ok(VirtioPciState {
            config: self.config.state(),
            msix: i.msix.state(),
            device_features: self.device_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(index, q)| QueueRegisters {
                    max_size: q.max_size,
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    msix_vector: i.queue_vector(index as u16),
                })
                .collect(),
            isr: i.isr.load(Ordering::Acquire),
            config_generation: i.config_generation.load(Ordering::Acquire),
            config_msix_vector: i.config_vector.load(Ordering::Acquire),
            activated: self.activated,
            needs_reset: self.activated && self.device.needs_reset(),
            pulled: self.pulled,
            progress,
        })
    }

    /// Puts `state` back into a function built the same way (same device type, queues, vector
    /// count and features), left paused: [`resume`](Self::resume) starts the device. An active
    /// device is restored active with its queues where they were ([`VirtioDevice::restore_active`]),
    /// failing every request if it had been pulled out and its driver had not reset it yet.
    /// Refused, changing nothing, if the state does not fit.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let model = self.model();
        expect_same(
            &model,
            "device features",
            state.device_features,
            self.device_features,
        )?;
        expect_same(
            &model,
            "queue sizes",
            state.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
            self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
        )?;
        if let Some(p) = state.progress.iter().find(|p| {
            !state
                .queues
                .get(usize::from(p.index))
                .is_some_and(|q| q.enabled)
        }) {
            return Err(StateError::new(
                model,
                format!("saved progress of queue {}, which is not enabled", p.index),
            ));
        }
        let vectors = self.interrupts.msix.vectors();
        let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || v < vectors;
        if !vector_ok(state.config_msix_vector)
            || !state.queues.iter().all(|q| vector_ok(q.msix_vector))
        {
            return Err(StateError::new(model, "saved MSI-X vector out of range"));
        }
        let mut config = self.config.clone();
        config.restore(&model, &state.config)?;
        // From here on nothing is refused but a device that cannot start its queues.
        self.reset();
        self.interrupts.msix.restore(&state.msix)?;
        self.config = config;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features & self.device_features;
        self.status = state.status;
        self.queue_select = state.queue_select;
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            q.size = saved.size;
            q.enabled = saved.enabled;
            q.desc = saved.desc;
            q.driver = saved.driver;
            q.device = saved.device;
        }
        let i = &self.interrupts;
        i.isr.store(state.isr, Ordering::Release);
        i.config_generation
            .store(state.config_generation, Ordering::Release);
        i.config_vector
            .store(state.config_msix_vector, Ordering::Release);
        for (v, saved) in i.queue_vectors.iter().zip(&state.queues) {
            v.store(saved.msix_vector, Ordering::Release);
        }
        self.pulled = state.pulled;
        self.paused = Some(state.progress.clone());
        if state.activated {
            let features = self.driver_features;
            let queues = self
                .active_queues(features, &state.progress)
                .map_err(|reason| StateError::new(self.model(), reason))?;
            self.activated = true;
            let interrupt: Arc<dyn VirtioInterrupt> = self.interrupts.clone();
            let flags = (state.pulled, state.needs_reset);
            if let Err(e) =
                self.device
                    .restore_active(self.memory.clone(), interrupt, features, queues, flags)
            {
                self.activated = false;
                self.paused = None;
                return Err(StateError::new(self.model(), e.to_string()));
            }
        }
        Ok(())
    }

    fn model(&self) -> String {
        format!("virtio-pci {}", self.device.id())
    }

    // ---- Common configuration ----

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue if the driver may still configure it: it exists, is not enabled yet
    /// and DRIVER_OK is not set (§4.1.4.3.2).
    fn configurable_queue(&mut self) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| q.max_size > 0 && !q.enabled)
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let selected = self.selected_queue();
        let value: Option<u64> = match (offset, data.len()) {
            (COMMON_DEVICE_FEATURE_SELECT, 4) => Some(self.device_feature_select.into()),
            (COMMON_DEVICE_FEATURE, 4) => Some(match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            }),
            (COMMON_DRIVER_FEATURE_SELECT, 4) => Some(self.driver_feature_select.into()),
            (COMMON_DRIVER_FEATURE, 4) => Some(match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            }),
            (COMMON_CONFIG_MSIX_VECTOR, 2) => {
                Some(self.interrupts.config_vector.load(Ordering::Acquire).into())
            }
            // At most MAX_QUEUES.
            (COMMON_NUM_QUEUES, 2) => Some(self.queues.len() as u64),
            (COMMON_DEVICE_STATUS, 1) => Some(self.status().into()),
            (COMMON_CONFIG_GENERATION, 1) => Some(
                self.interrupts
                    .config_generation
                    .load(Ordering::Acquire)
                    .into(),
            ),
            (COMMON_QUEUE_SELECT, 2) => Some(self.queue_select.into()),
            // 0: the queue is unavailable (§4.1.4.3).
            (COMMON_QUEUE_SIZE, 2) => Some(selected.map_or(0, |q| q.size.into())),
            (COMMON_QUEUE_MSIX_VECTOR, 2) => {
                Some(self.interrupts.queue_vector(self.queue_select).into())
            }
            (COMMON_QUEUE_ENABLE, 2) => Some(selected.map_or(0, |q| q.enabled.into())),
            (COMMON_QUEUE_NOTIFY_OFF, 2) => Some(selected.map_or(0, |_| self.queue_select.into())),
            _ => queue_address_field(offset, data.len()).map(|(field, part)| {
                let address = selected.map_or(0, |q| [q.desc, q.driver, q.device][field]);
                match part {
                    AddressPart::Whole => address,
                    AddressPart::Low => address & 0xffff_ffff,
                    AddressPart::High => address >> 32,
                }
            }),
        };
        match value {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
            None => log::debug!(
                "virtio-pci {}: unsupported common config read of {} bytes at {offset:#x}",
                self.device.id(),
                data.len()
            ),
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let Some(dst) = bytes.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        // The casts below keep the field's width: `value` has only `data.len()` bytes.
        match (offset, data.len()) {
            (COMMON_DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (COMMON_DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (COMMON_DRIVER_FEATURE, 4) => self.write_driver_features(value),
            (COMMON_CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.accepted_vector(value as u16);
                self.interrupts
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (COMMON_DEVICE_STATUS, 1) => self.write_status(value as u8),
            (COMMON_QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (COMMON_QUEUE_SIZE, 2) => {
                if let Some(queue) = self.configurable_queue() {
                    let size = value as u16;
                    if size.is_power_of_two() && size <= queue.max_size {
                        queue.size = size;
                    } else {
                        log::debug!("virtio-pci: ignoring queue size {size}");
                    }
                }
            }
            (COMMON_QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.accepted_vector(value as u16);
                if let Some(slot) = self
                    .interrupts
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(vector, Ordering::Release);
                }
            }
            (COMMON_QUEUE_ENABLE, 2) => {
                // Writing 0 is only meaningful with VIRTIO_F_RING_RESET, not offered.
                if value == 1 {
                    if let Some(queue) = self.configurable_queue() {
                        queue.enabled = true;
                    }
                }
            }
            _ => match queue_address_field(offset, data.len()) {
                Some((field, part)) => {
                    if let Some(queue) = self.configurable_queue() {
                        let address = match field {
                            0 => &mut queue.desc,
                            1 => &mut queue.driver,
                            _ => &mut queue.device,
                        };
                        *address = match part {
                            AddressPart::Whole => value,
                            AddressPart::Low => (*address & !0xffff_ffff) | value,
                            AddressPart::High => (*address & 0xffff_ffff) | (value << 32),
                        };
                    }
                }
                None => log::debug!(
                    "virtio-pci {}: ignoring common config write of {} bytes at {offset:#x}",
                    self.device.id(),
                    data.len()
                ),
            },
        }
    }

    /// The vector a `*_msix_vector` write leaves in the register: the vector if the table has it,
    /// NO_VECTOR otherwise, which tells the driver the mapping failed (§4.1.5.1.2.1).
    fn accepted_vector(&self, vector: u16) -> u16 {
        if vector < self.interrupts.msix.vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u64) {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
            log::debug!("virtio-pci: ignoring driver features after FEATURES_OK");
            return;
        }
        self.driver_features = match self.driver_feature_select {
            0 => (self.driver_features & !0xffff_ffff) | value,
            1 => (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => self.driver_features,
        };
    }

    /// Whether the driver's features are acceptable (§2.2.2, §3.1.1): a subset of the offer,
    /// VIRTIO_F_VERSION_1 included (this transport has no legacy interface).
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & (1 << features::VIRTIO_F_VERSION_1) != 0
    }

    /// A driver write to `device_status` (§2.1, §3.1.1, §4.1.4.3.1).
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver sets bits one step at a time and never clears one (§2.1.1); only a reset
        // clears them. DEVICE_NEEDS_RESET is not the driver's to set.
        let mut new = old | (value & DRIVER_STATUS_BITS);
        if new & !old & status::FEATURES_OK != 0 && !self.features_acceptable() {
            crate::guest_log::report(
                "virtio features refused",
                log::Level::Info,
                format_args!(
                    "virtio-pci {}: refusing FEATURES_OK for features {:#x} (offered {:#x})",
                    self.device.id(),
                    self.driver_features,
                    self.device_features
                ),
            );
            new &= !status::FEATURES_OK;
        }
        let driver_ok = new & !old & status::DRIVER_OK != 0;
        if driver_ok && (new & status::FEATURES_OK == 0 || new & status::FAILED != 0) {
            crate::guest_log::report(
                "virtio DRIVER_OK refused",
                log::Level::Info,
                format_args!(
                    "virtio-pci {}: ignoring DRIVER_OK in status {new:#x}",
                    self.device.id()
                ),
            );
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if new & !old & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// DRIVER_OK: hands the enabled queues to the device (§3.1.1 step 8).
    fn activate(&mut self) {
        let features = self.driver_features & self.device_features;
        let queues = match self.active_queues(features, &[]) {
            Ok(queues) => queues,
            Err(reason) => {
                self.needs_reset(&reason);
                return;
            }
        };
        self.activated = true;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupts.clone();
        if let Err(e) = self
            .device
            .activate(self.memory.clone(), interrupt, features, queues)
        {
            self.needs_reset(&e.to_string());
        }
    }

    /// The enabled queues as the driver described them, for the device: each at the position
    /// `progress` gives it (a restore), or at the start. `Err` names the first queue that is
    /// unusable on guest memory.
    fn active_queues(
        &self,
        features: u64,
        progress: &[QueueProgress],
    ) -> Result<Vec<ActiveQueue>, String> {
        let mut queues = Vec::new();
        for (index, (config, notify)) in self.queues.iter().zip(&self.notify).enumerate() {
            if !config.enabled {
                continue;
            }
            let mut queue = config
                .build(features, &self.memory)
                .map_err(|reason| format!("queue {index}: {reason}"))?;
            // A device that does not use a queue's rings reports no progress for it.
            if let Some(p) = progress.iter().find(|p| usize::from(p.index) == index) {
                queue.set_next_avail(p.next_avail);
                queue.set_next_used(p.next_used);
            }
            queues.push(ActiveQueue {
                // Below MAX_QUEUES.
                index: index as u16,
                queue,
                notify: notify.clone(),
            });
        }
        Ok(queues)
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver through a configuration interrupt (§2.1.2).
    fn needs_reset(&mut self, reason: &str) {
        crate::guest_log::report(
            "virtio device needs reset",
            log::Level::Warn,
            format_args!(
                "virtio-pci {}: device needs reset: {reason}",
                self.device.id()
            ),
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupts.trigger(VirtioInterruptType::Config) {
            log::warn!(
                "virtio-pci {}: configuration interrupt failed: {e}",
                self.device.id()
            );
        }
    }

    // ---- The other regions of BAR 0 ----

    fn notify_write(&mut self, offset: u64, data: &[u8]) {
        let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
        if data.is_empty() || !offset.is_multiple_of(multiplier) {
            return;
        }
        if let Ok(index) = u16::try_from(offset / multiplier) {
            self.notify_queue(index);
        }
    }

    /// Queue `index` was notified: the device serves it here if it
    /// [fails on notify](VirtioDevice::fail_on_notify), or its event is signalled.
    fn notify_queue(&mut self, index: u16) {
        let i = usize::from(index);
        let (Some(event), Some(queue)) = (self.notify.get(i), self.queues.get(i)) else {
            return;
        };
        if queue.max_size == 0 || (self.activated && self.device.queue_notified(index)) {
            return;
        }
        if let Err(e) = event.write(1) {
            log::warn!("virtio-pci: signalling queue {index} failed: {e}");
        }
    }

    /// A device pulled out by surprise that is still [failing](Self::is_failing) requests
    /// fails them from now on on the thread that notifies it, through the BAR
    /// ([`VirtioDevice::fail_on_notify`]). True if it does: the VMM then unregisters the
    /// queues' ioeventfds and calls [`notify_queues`](Self::notify_queues); false: it goes on
    /// failing them on its own thread, and the ioeventfds must stay.
    pub fn fail_on_notify(&mut self) -> bool {
        self.is_failing() && self.device.fail_on_notify()
    }

    /// As if the driver had notified every available queue through the BAR: for what was
    /// notified while the VMM moved the notifications from ioeventfds to the BAR.
    pub fn notify_queues(&mut self) {
        for index in 0..self.queues.len() {
            self.notify_queue(index as u16);
        }
    }

    /// The BAR 0 access window of the `VIRTIO_PCI_CAP_PCI_CFG` capability as the driver set it,
    /// if it is one this device serves: BAR 0, length 1, 2 or 4, aligned, inside the BAR
    /// (§4.1.4.9.1 leaves other windows undefined; they do nothing).
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + VIRTIO_CAP_BAR);
        let offset = u64::from(self.config.read_u32(cap + VIRTIO_CAP_OFFSET));
        let length = self.config.read_u32(cap + VIRTIO_CAP_LENGTH);
        let len = match length {
            1 | 2 | 4 => length as usize,
            _ => return None,
        };
        let fits = offset.is_multiple_of(len as u64) && offset + len as u64 <= BAR0_SIZE;
        (usize::from(bar) == VIRTIO_BAR && fits).then_some((offset, len))
    }

    fn touches_pci_cfg_data(&self, offset: u16, len: usize) -> bool {
        overlaps(
            u64::from(offset),
            len as u64,
            u64::from(self.pci_cfg_cap + VIRTIO_PCI_CFG_CAP_DATA),
            4,
        )
    }
}

impl PciDevice for VirtioPciDevice {
    fn id(&self) -> &str {
        self.device.id()
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if self.touches_pci_cfg_data(offset, data.len()) {
            // §4.1.4.9: a read of pci_cfg_data reads the window first.
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut window = [0u8; 4];
                self.bar_read(VIRTIO_BAR, bar_offset, &mut window[..len]);
                self.config
                    .set_bytes(self.pci_cfg_cap + VIRTIO_PCI_CFG_CAP_DATA, &window[..len]);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
        let result = self.config.write(offset, data);
        let control = self.msix_cap + MSIX_CAP_MESSAGE_CONTROL;
        if overlaps(u64::from(offset), data.len() as u64, u64::from(control), 2) {
            self.interrupts
                .msix
                .set_message_control(self.config.read_u16(control));
        }
        if self.touches_pci_cfg_data(offset, data.len()) {
            // §4.1.4.9: a write of pci_cfg_data writes the window with its first bytes.
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut window = [0u8; 4];
                self.config
                    .read(self.pci_cfg_cap + VIRTIO_PCI_CFG_CAP_DATA, &mut window);
                self.bar_write(VIRTIO_BAR, bar_offset, &window[..len]);
            }
        }
        result.into()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != VIRTIO_BAR || offset >= BAR0_SIZE {
            data.fill(0xff);
            return;
        }
        data.fill(0);
        if self.pulled {
            return;
        }
        match offset {
            o if o < ISR_CFG_OFFSET => self.common_read(o - COMMON_CFG_OFFSET, data),
            // §4.1.4.5: reading the ISR status clears it.
            ISR_CFG_OFFSET => {
                if let Some(first) = data.first_mut() {
                    *first = self.interrupts.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if o < DEVICE_CFG_OFFSET => {} // the rest of the ISR region reads zero
            o if o < NOTIFY_CFG_OFFSET => self.device.read_config(o - DEVICE_CFG_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => {} // notify addresses read zero
            o if o < MSIX_PBA_OFFSET => {
                self.interrupts.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if o < MSIX_PBA_END => self.interrupts.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR || offset >= BAR0_SIZE {
            return;
        }
        if self.pulled {
            // Gone: only the driver's reset means anything, and, while the device still fails
            // requests, what it still serves: the notifications, and the MSI-X table that its
            // interrupts follow (a vector the driver masks holds them pending, as before).
            match offset {
                o if o == COMMON_CFG_OFFSET + COMMON_DEVICE_STATUS && data == [0] => self.reset(),
                o if (NOTIFY_CFG_OFFSET..MSIX_TABLE_OFFSET).contains(&o) && self.is_failing() => {
                    self.notify_write(o - NOTIFY_CFG_OFFSET, data)
                }
                o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) && self.is_failing() => self
                    .interrupts
                    .msix
                    .write_table(o - MSIX_TABLE_OFFSET, data),
                _ => {}
            }
            return;
        }
        match offset {
            o if o < ISR_CFG_OFFSET => self.common_write(o - COMMON_CFG_OFFSET, data),
            o if o < DEVICE_CFG_OFFSET => {} // the ISR status is read-only
            o if o < NOTIFY_CFG_OFFSET => self.device.write_config(o - DEVICE_CFG_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => self.notify_write(o - NOTIFY_CFG_OFFSET, data),
            o if o < MSIX_PBA_OFFSET => self
                .interrupts
                .msix
                .write_table(o - MSIX_TABLE_OFFSET, data),
            o if o < MSIX_PBA_END => self.interrupts.msix.write_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn decoded_bars(&self) -> Vec<BarRegion> {
        self.config.decoded_bars()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestMemoryAtomic};

    use super::super::ActivateError;
    use super::*;
    use crate::interrupt::MsiMessage;
    use crate::pci::configuration::{
        BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE,
        CONFIG_SPACE_SIZE, INTERRUPT_PIN, STATUS, STATUS_CAPABILITIES_LIST,
    };
    use crate::pci::msix::tests::{MsiEvent, RecordingGroup};
    use crate::pci::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK};
    use crate::virtio::GuestRam;

    const VERSION_1: u64 = 1 << features::VIRTIO_F_VERSION_1;
    const EVENT_IDX: u64 = 1 << features::VIRTIO_RING_F_EVENT_IDX;
    const BLK_F_FLUSH: u64 = 1 << 9;
    const MEMORY_SIZE: usize = 0x10_0000;
    const BAR0_ADDRESS: u64 = 0x8_0000_0000;

    /// One queue as the device received it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct SeenQueue {
        index: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    }

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, Vec<SeenQueue>)>,
        resets: usize,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        notify: Vec<Arc<EventFd>>,
        config_writes: Vec<(u64, Vec<u8>)>,
        needs_reset: bool,
        shutdowns: usize,
    }

    struct FakeDevice {
        log: Arc<Mutex<Log>>,
        max_sizes: Vec<u16>,
        features: u64,
        fail_activate: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn id(&self) -> &str {
            "fake0"
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            self.max_sizes.clone()
        }
        fn features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config: Vec<u8> = (0x11..0x19).collect();
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| config.get(o).copied())
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _memory: GuestMemory,
            interrupt: Arc<dyn VirtioInterrupt>,
            features: u64,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mut log = self.log.lock().unwrap();
            let seen = queues
                .iter()
                .map(|q| SeenQueue {
                    index: q.index,
                    size: q.queue.size(),
                    desc: q.queue.desc_table(),
                    avail: q.queue.avail_ring(),
                    used: q.queue.used_ring(),
                    event_idx: q.queue.event_idx_enabled(),
                })
                .collect();
            log.activations.push((features, seen));
            log.notify = queues.iter().map(|q| q.notify.clone()).collect();
            log.interrupt = Some(interrupt);
            if self.fail_activate {
                return Err(ActivateError::Failed {
                    id: "fake0".into(),
                    reason: "backend gone".into(),
                });
            }
            Ok(())
        }
        fn reset(&mut self) {
            let mut log = self.log.lock().unwrap();
            log.resets += 1;
            log.needs_reset = false;
            log.notify.clear();
            log.interrupt = None;
        }
        fn needs_reset(&self) -> bool {
            self.log.lock().unwrap().needs_reset
        }
        fn shutdown(&mut self) {
            self.log.lock().unwrap().shutdowns += 1;
            self.reset();
        }
        /// Like a virtio-blk device: with `Fail` it goes on failing requests until reset.
        fn surprise_remove(&mut self, in_flight: InFlightPolicy) -> InFlightOutcome {
            match in_flight {
                InFlightPolicy::Fail => InFlightOutcome {
                    failing: true,
                    ..InFlightOutcome::default()
                },
                InFlightPolicy::Drop => {
                    self.shutdown();
                    InFlightOutcome::default()
                }
            }
        }
    }

    struct Harness {
        dev: VirtioPciDevice,
        log: Arc<Mutex<Log>>,
        group: Arc<RecordingGroup>,
    }

    fn harness_with(max_sizes: Vec<u16>, features: u64, fail_activate: bool) -> Harness {
        let log = Arc::new(Mutex::new(Log::default()));
        let group = Arc::new(RecordingGroup::default());
        let mmap = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap();
        let device = FakeDevice {
            log: log.clone(),
            max_sizes,
            features,
            fail_activate,
        };
        assert_eq!(VirtioPciDevice::msix_vector_count(&device), 3);
        let dev = VirtioPciDevice::new(
            Box::new(device),
            GuestMemoryAtomic::new(mmap),
            group.clone(),
        )
        .unwrap();
        Harness { dev, log, group }
    }

    fn harness() -> Harness {
        harness_with(vec![256, 128], VERSION_1 | EVENT_IDX | BLK_F_FLUSH, false)
    }

    impl Harness {
        fn read(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.bar_read(0, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn write(&mut self, offset: u64, len: usize, value: u64) {
            self.dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
        }
        fn common8(&mut self, field: u64) -> u8 {
            self.read(COMMON_CFG_OFFSET + field, 1) as u8
        }
        fn common16(&mut self, field: u64) -> u16 {
            self.read(COMMON_CFG_OFFSET + field, 2) as u16
        }
        fn common32(&mut self, field: u64) -> u32 {
            self.read(COMMON_CFG_OFFSET + field, 4) as u32
        }
        fn set_status(&mut self, value: u8) {
            self.write(COMMON_CFG_OFFSET + COMMON_DEVICE_STATUS, 1, value.into());
        }
        fn status(&mut self) -> u8 {
            self.common8(COMMON_DEVICE_STATUS)
        }
        fn cfg_read(&mut self, offset: u16, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.config_read(offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn cfg_write(&mut self, offset: u16, len: usize, value: u64) -> ConfigWriteResult {
            self.dev.config_write(offset, &value.to_le_bytes()[..len])
        }
        /// Every vendor capability as (offset, cfg_type), walking the list like Linux.
        fn vendor_caps(&mut self) -> Vec<(u16, u8)> {
            let mut caps = Vec::new();
            let mut pos = self.cfg_read(CAPABILITIES_POINTER, 1) as u16;
            for _ in 0..48 {
                if pos == 0 {
                    break;
                }
                if self.cfg_read(pos, 1) as u8 == CAP_ID_VENDOR_SPECIFIC {
                    caps.push((pos, self.cfg_read(pos + VIRTIO_CAP_CFG_TYPE, 1) as u8));
                }
                pos = self.cfg_read(pos + 1, 1) as u16;
            }
            caps
        }
        fn msix_cap(&mut self) -> u16 {
            let mut pos = self.cfg_read(CAPABILITIES_POINTER, 1) as u16;
            while self.cfg_read(pos, 1) as u8 != CAP_ID_MSIX {
                pos = self.cfg_read(pos + 1, 1) as u16;
                assert_ne!(pos, 0);
            }
            pos
        }
        fn set_msix_control(&mut self, value: u16) {
            let cap = self.msix_cap();
            let _ = self.cfg_write(cap + MSIX_CAP_MESSAGE_CONTROL, 2, value.into());
        }
        /// Programs MSI-X table entry `vector` and unmasks it, like Linux.
        fn program_vector(&mut self, vector: u64, data: u32) {
            let entry = MSIX_TABLE_OFFSET + 16 * vector;
            self.write(entry, 4, 0xfee0_0000);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, data.into());
            self.write(entry + 12, 4, 0);
        }
        /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK: virtio_dev_probe's order.
        fn negotiate(&mut self, driver_features: u64) -> u8 {
            self.set_status(0);
            assert_eq!(self.status(), 0);
            self.set_status(status::ACKNOWLEDGE);
            self.set_status(status::ACKNOWLEDGE | status::DRIVER);
            self.write(COMMON_DRIVER_FEATURE_SELECT, 4, 0);
            self.write(COMMON_DRIVER_FEATURE, 4, driver_features & 0xffff_ffff);
            self.write(COMMON_DRIVER_FEATURE_SELECT, 4, 1);
            self.write(COMMON_DRIVER_FEATURE, 4, driver_features >> 32);
            self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            self.status()
        }
        /// vp_modern's setup_vq for queue `index` plus queue_enable.
        fn setup_queue(&mut self, index: u16, size: u16, base: u64, vector: u16) {
            self.write(COMMON_QUEUE_SELECT, 2, index.into());
            assert_ne!(self.common16(COMMON_QUEUE_SIZE), 0);
            self.write(COMMON_QUEUE_SIZE, 2, size.into());
            for (field, address) in [
                (COMMON_QUEUE_DESC, base),
                (COMMON_QUEUE_DRIVER, base + 0x1000),
                (COMMON_QUEUE_DEVICE, base + 0x2000),
            ] {
                self.write(field, 4, address & 0xffff_ffff);
                self.write(field + 4, 4, address >> 32);
            }
            assert_eq!(self.common16(COMMON_QUEUE_NOTIFY_OFF), index);
            self.write(COMMON_QUEUE_MSIX_VECTOR, 2, vector.into());
            assert_eq!(self.common16(COMMON_QUEUE_MSIX_VECTOR), vector);
            self.write(COMMON_QUEUE_ENABLE, 2, 1);
        }
        fn driver_ok(&mut self) {
            self.set_status(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            );
        }
        fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
            self.log.lock().unwrap().interrupt.clone().unwrap()
        }
    }

    #[test]
    fn ring_indices_are_read_from_the_rings_the_driver_set_up() {
        let mut h = harness();
        h.negotiate(VERSION_1 | EVENT_IDX);
        h.setup_queue(0, 16, 0x1_0000, 1);
        assert!(h.dev.ring_indices().is_empty(), "not activated yet");
        h.driver_ok();
        let mem = h.dev.memory.memory();
        // avail.idx, used.idx, and used_event after the avail ring's 16 entries.
        mem.write_obj(5u16.to_le(), GuestAddress(0x1_1000 + 2))
            .unwrap();
        mem.write_obj(3u16.to_le(), GuestAddress(0x1_2000 + 2))
            .unwrap();
        mem.write_obj(2u16.to_le(), GuestAddress(0x1_1000 + 4 + 2 * 16))
            .unwrap();
        assert_eq!(
            h.dev.ring_indices(),
            vec![RingIndices {
                index: 0,
                avail: 5,
                used: 3,
                used_event: Some(2)
            }]
        );
        // Without VIRTIO_RING_F_EVENT_IDX the driver says nothing of what it took.
        h.negotiate(VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 1);
        h.driver_ok();
        assert_eq!(h.dev.ring_indices()[0].used_event, None);
    }

    #[test]
    fn identity_and_capabilities() {
        let mut h = harness();
        assert_eq!(h.cfg_read(0, 4), 0x1042_1af4);
        assert_eq!(h.cfg_read(8, 4), 0x0100_0001, "class 01/00/00, revision 1");
        assert_eq!(h.cfg_read(0x2c, 4), 0x1100_1af4);
        assert_eq!(h.cfg_read(INTERRUPT_PIN, 1), 0);
        assert_ne!(h.cfg_read(STATUS, 2) as u16 & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(PciDevice::id(&h.dev), "fake0");
        // BAR 0: 64-bit, non-prefetchable, BAR0_SIZE bytes.
        assert_eq!(h.cfg_read(BAR0, 4), 0x4);
        let _ = h.cfg_write(BAR0, 4, 0xffff_ffff);
        let _ = h.cfg_write(BAR0 + 4, 4, 0xffff_ffff);
        assert_eq!(h.cfg_read(BAR0, 4), (!(BAR0_SIZE - 1) & 0xffff_ffff) | 0x4);
        assert_eq!(h.cfg_read(BAR0 + 4, 4), 0xffff_ffff);
        // Every virtio structure, once, in BAR 0, where the constants say.
        let caps = h.vendor_caps();
        let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
        assert_eq!(types, vec![1, 3, 4, 2, 5]);
        let expect = [
            (COMMON_CFG_OFFSET, COMMON_CFG_SIZE, 16),
            (ISR_CFG_OFFSET, ISR_CFG_SIZE, 16),
            (DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, 16),
            (NOTIFY_CFG_OFFSET, 8, 20),
            (0, 0, 20),
        ];
        for ((pos, _), (offset, length, cap_len)) in caps.iter().zip(expect) {
            assert_eq!(h.cfg_read(pos + VIRTIO_CAP_LEN, 1), cap_len);
            assert_eq!(h.cfg_read(pos + VIRTIO_CAP_BAR, 1), 0);
            assert_eq!(h.cfg_read(pos + VIRTIO_CAP_OFFSET, 4), offset);
            assert_eq!(h.cfg_read(pos + VIRTIO_CAP_LENGTH, 4), length);
        }
        let notify = caps[3].0;
        assert_eq!(h.cfg_read(notify + VIRTIO_NOTIFY_CAP_MULTIPLIER, 4), 4);
        // The capabilities are read-only, except the PCI_CFG window.
        let _ = h.cfg_write(notify + VIRTIO_CAP_OFFSET, 4, 0);
        assert_eq!(h.cfg_read(notify + VIRTIO_CAP_OFFSET, 4), NOTIFY_CFG_OFFSET);
        // MSI-X: 3 vectors, table and PBA in BAR 0.
        let msix = h.msix_cap();
        assert_eq!(h.cfg_read(msix + 2, 2), 2);
        assert_eq!(h.cfg_read(msix + 4, 4), MSIX_TABLE_OFFSET);
        assert_eq!(h.cfg_read(msix + 8, 4), MSIX_PBA_OFFSET);
        assert_eq!(h.dev.msix_vectors(), 3);
    }

    #[test]
    fn class_codes() {
        assert_eq!(virtio_pci_class(VIRTIO_ID_BLOCK), (1, 0, 0));
        assert_eq!(virtio_pci_class(VIRTIO_ID_NET), (2, 0, 0));
        assert_eq!(virtio_pci_class(VIRTIO_ID_CONSOLE), (7, 0x80, 0));
        assert_eq!(virtio_pci_class(26), (0xff, 0, 0));
    }

    /// The Linux virtio_pci_modern + virtio_blk probe, register by register.
    #[test]
    fn linux_init_sequence() {
        let mut h = harness();
        // Enumeration: BAR assignment and Memory Space/Bus Master enable.
        let _ = h.cfg_write(BAR0, 4, BAR0_ADDRESS & 0xffff_ffff);
        let _ = h.cfg_write(BAR0 + 4, 4, BAR0_ADDRESS >> 32);
        let r = h.cfg_write(
            COMMAND,
            2,
            (COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).into(),
        );
        assert_eq!(r.bar_reprograms.len(), 1);
        assert_eq!(r.bar_reprograms[0].new, Some(BAR0_ADDRESS));
        assert_eq!(h.dev.decoded_bars()[0].address, BAR0_ADDRESS);
        let fds = h.dev.ioeventfds(BAR0_ADDRESS);
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[0].0, BAR0_ADDRESS + NOTIFY_CFG_OFFSET);
        assert_eq!(fds[1].0, BAR0_ADDRESS + NOTIFY_CFG_OFFSET + 4);
        assert_eq!(fds[1].1, 2);

        // pci_alloc_irq_vectors: enable with the function masked, program, unmask the function.
        h.set_msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        for v in 0..3 {
            h.program_vector(v, 0x30 + v as u32);
        }
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        let updates = h.group.take();
        assert!(updates.contains(&MsiEvent::Update(
            2,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x32
            },
            true
        )));

        // virtio_dev_probe: reset, ACKNOWLEDGE, DRIVER.
        h.set_status(0);
        assert_eq!(h.status(), 0);
        h.set_status(status::ACKNOWLEDGE);
        assert_eq!(h.status(), status::ACKNOWLEDGE);
        h.set_status(status::ACKNOWLEDGE | status::DRIVER);
        // Device features.
        h.write(COMMON_DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(h.common32(COMMON_DEVICE_FEATURE_SELECT), 0);
        let low = h.common32(COMMON_DEVICE_FEATURE);
        h.write(COMMON_DEVICE_FEATURE_SELECT, 4, 1);
        let high = h.common32(COMMON_DEVICE_FEATURE);
        let offered = (u64::from(high) << 32) | u64::from(low);
        assert_eq!(offered, VERSION_1 | EVENT_IDX | BLK_F_FLUSH);
        h.write(COMMON_DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(h.common32(COMMON_DEVICE_FEATURE), 0);
        // Driver features: everything but FLUSH.
        let accepted = VERSION_1 | EVENT_IDX;
        h.write(COMMON_DRIVER_FEATURE_SELECT, 4, 0);
        h.write(COMMON_DRIVER_FEATURE, 4, accepted & 0xffff_ffff);
        h.write(COMMON_DRIVER_FEATURE_SELECT, 4, 1);
        h.write(COMMON_DRIVER_FEATURE, 4, accepted >> 32);
        assert_eq!(h.common32(COMMON_DRIVER_FEATURE), 1);
        h.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(h.status() & status::FEATURES_OK, 0);
        // virtblk_probe reads its configuration (capacity), checking the generation.
        let generation = h.common8(COMMON_CONFIG_GENERATION);
        assert_eq!(h.read(DEVICE_CFG_OFFSET, 8), 0x1817_1615_1413_1211);
        assert_eq!(h.read(DEVICE_CFG_OFFSET + 4, 2), 0x1615);
        assert_eq!(h.common8(COMMON_CONFIG_GENERATION), generation);
        // vp_find_vqs_msix: config vector 0, queues 1 and 2.
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(h.common16(COMMON_CONFIG_MSIX_VECTOR), 0);
        assert_eq!(h.common16(COMMON_NUM_QUEUES), 2);
        h.write(COMMON_QUEUE_SELECT, 2, 0);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 256);
        h.setup_queue(0, 128, 0x1_0000, 1);
        h.write(COMMON_QUEUE_SELECT, 2, 1);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 128);
        h.setup_queue(1, 64, 0x2_0000, 2);
        // Read back what was programmed.
        h.write(COMMON_QUEUE_SELECT, 2, 0);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 128);
        assert_eq!(h.common16(COMMON_QUEUE_ENABLE), 1);
        assert_eq!(h.read(COMMON_QUEUE_DRIVER, 8), 0x1_1000);
        assert_eq!(h.common32(COMMON_QUEUE_DEVICE), 0x1_2000);
        assert_eq!(h.common32(COMMON_QUEUE_DEVICE + 4), 0);
        assert!(h.log.lock().unwrap().activations.is_empty());
        // DRIVER_OK.
        h.driver_ok();
        assert_eq!(h.status(), 0x0f);
        assert!(h.dev.is_activated());
        {
            let log = h.log.lock().unwrap();
            assert_eq!(log.activations.len(), 1);
            let (features, queues) = &log.activations[0];
            assert_eq!(*features, accepted);
            assert_eq!(
                queues,
                &vec![
                    SeenQueue {
                        index: 0,
                        size: 128,
                        desc: 0x1_0000,
                        avail: 0x1_1000,
                        used: 0x1_2000,
                        event_idx: true
                    },
                    SeenQueue {
                        index: 1,
                        size: 64,
                        desc: 0x2_0000,
                        avail: 0x2_1000,
                        used: 0x2_2000,
                        event_idx: true
                    }
                ]
            );
            // The queue events are the ones offered for ioeventfds.
            assert!(Arc::ptr_eq(&log.notify[1], &fds[1].2));
        }
        // Kick queue 1 through the BAR (no ioeventfd registered).
        h.write(NOTIFY_CFG_OFFSET + 4, 2, 1);
        assert_eq!(fds[1].2.read().unwrap(), 1);
        assert!(fds[0].2.read().is_err(), "queue 0 was not kicked");
        // A used-buffer notification on queue 1 goes out as vector 2.
        h.group.take();
        h.interrupt()
            .trigger(VirtioInterruptType::Queue(1))
            .unwrap();
        h.interrupt()
            .trigger(VirtioInterruptType::Queue(0))
            .unwrap();
        assert_eq!(
            h.group.take(),
            vec![MsiEvent::Trigger(2), MsiEvent::Trigger(1)]
        );
        assert_eq!(
            h.read(ISR_CFG_OFFSET, 1),
            0,
            "queue interrupts went as MSI-X"
        );
        // A configuration change: vector 0, ISR bit 1, new generation.
        h.interrupt().trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(h.group.take(), vec![MsiEvent::Trigger(0)]);
        assert_eq!(
            h.common8(COMMON_CONFIG_GENERATION),
            generation.wrapping_add(1)
        );
        assert_eq!(h.read(ISR_CFG_OFFSET, 4), u64::from(ISR_CONFIG));
        assert_eq!(h.read(ISR_CFG_OFFSET, 1), 0, "read to clear");
        // Queue configuration is frozen after DRIVER_OK.
        h.write(COMMON_QUEUE_SELECT, 2, 0);
        h.write(COMMON_QUEUE_SIZE, 2, 16);
        h.write(COMMON_QUEUE_DESC, 4, 0x5000);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 128);
        assert_eq!(h.common32(COMMON_QUEUE_DESC), 0x1_0000);
    }

    #[test]
    fn reset_while_active() {
        let mut h = harness();
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        h.program_vector(1, 0x41);
        assert_ne!(h.negotiate(VERSION_1) & status::FEATURES_OK, 0);
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        assert!(h.dev.is_activated());
        let fds = h.dev.ioeventfds(BAR0_ADDRESS);
        h.write(NOTIFY_CFG_OFFSET, 2, 0);
        let interrupt = h.interrupt();
        // Reset: the device is told, every negotiated value is gone.
        h.set_status(0);
        assert_eq!(h.status(), 0);
        assert!(!h.dev.is_activated());
        assert_eq!(h.log.lock().unwrap().resets, 1);
        assert_eq!(h.common16(COMMON_CONFIG_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(h.common32(COMMON_DRIVER_FEATURE), 0);
        assert_eq!(h.common16(COMMON_QUEUE_SELECT), 0);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 256);
        assert_eq!(h.common16(COMMON_QUEUE_ENABLE), 0);
        assert_eq!(h.common32(COMMON_QUEUE_DESC), 0);
        assert_eq!(h.common16(COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
        assert!(fds[0].2.read().is_err(), "stale kick drained");
        // A late interrupt from the old activation goes nowhere.
        h.group.take();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(h.group.take().is_empty());
        // The MSI-X table is PCI state and survives.
        assert_eq!(h.read(MSIX_TABLE_OFFSET + 16 + 8, 4), 0x41);
        // A second reset does not bother the device again; a new activation works.
        h.set_status(0);
        assert_eq!(h.log.lock().unwrap().resets, 1);
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        assert_eq!(h.log.lock().unwrap().activations.len(), 2);
        // The device reports an unrecoverable error.
        h.log.lock().unwrap().needs_reset = true;
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(!h.dev.is_activated());
        h.log.lock().unwrap().needs_reset = false;
        assert!(h.dev.is_activated());
        // The VMM's own reset.
        h.dev.reset();
        assert_eq!(h.log.lock().unwrap().resets, 2);
        // Unplug: shutdown, once, and a reset transport.
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        h.dev.shutdown();
        assert_eq!(h.log.lock().unwrap().shutdowns, 1);
        assert_eq!(h.log.lock().unwrap().resets, 3, "shutdown's own reset only");
        assert_eq!(h.status(), 0);
        assert!(!h.dev.is_activated());
    }

    #[test]
    fn pulled_out_failing_until_the_driver_resets() {
        let mut h = harness();
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        h.program_vector(1, 0x41);
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        let fds = h.dev.ioeventfds(BAR0_ADDRESS);
        let interrupt = h.interrupt();

        let outcome = h.dev.surprise_remove(InFlightPolicy::Fail);
        assert!(outcome.failing && h.dev.is_failing());
        assert_eq!(h.log.lock().unwrap().resets, 0, "the device goes on");
        // The completions of the requests it fails still reach the driver's vector.
        h.group.take();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(h.group.take(), vec![MsiEvent::Trigger(1)]);
        // Gone for the guest: its BAR reads zero; the driver's writes change nothing, but a
        // notification still reaches the device ...
        assert_eq!(h.status(), 0);
        assert_eq!(h.read(MSIX_TABLE_OFFSET + 16 + 8, 4), 0);
        h.write(COMMON_QUEUE_SELECT, 2, 1);
        h.set_status(status::FAILED);
        h.write(NOTIFY_CFG_OFFSET, 2, 0);
        assert_eq!(fds[0].2.read().unwrap(), 1);
        assert!(h.dev.is_failing());
        assert_eq!(h.log.lock().unwrap().resets, 0);
        // ... and the interrupts it still sends follow the driver's MSI-X table: a masked
        // vector holds them pending until the driver unmasks it, a new message is used.
        let control = MSIX_TABLE_OFFSET + 16 + 12;
        h.write(control, 4, 1);
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(h.dev.interrupts.msix.is_pending(1));
        assert!(!h.group.take().contains(&MsiEvent::Trigger(1)));
        h.write(control, 4, 0);
        assert!(!h.dev.interrupts.msix.is_pending(1));
        assert!(h.group.take().contains(&MsiEvent::Trigger(1)));
        h.write(MSIX_TABLE_OFFSET + 16 + 8, 4, 0x99);
        assert_eq!(h.dev.interrupts.msix.entry(1).unwrap().0.data, 0x99);
        assert_eq!(h.read(MSIX_TABLE_OFFSET + 16 + 8, 4), 0, "still reads zero");
        h.group.take();
        // The driver's reset ends it: the device is reset, the vectors forgotten.
        h.set_status(0);
        assert!(!h.dev.is_failing());
        assert_eq!(h.log.lock().unwrap().resets, 1);
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(h.group.take().is_empty());
        h.write(NOTIFY_CFG_OFFSET, 2, 0);
        assert!(fds[0].2.read().is_err(), "no notification after the reset");
        h.write(control, 4, 1);
        assert!(
            !h.dev.interrupts.msix.entry(1).unwrap().1,
            "nor a table write"
        );
        // It stays gone: a new initialisation does nothing.
        h.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        h.write(COMMON_QUEUE_ENABLE, 2, 1);
        h.driver_ok();
        assert_eq!(h.log.lock().unwrap().activations.len(), 1);
        assert!(!h.dev.is_activated());

        // With Drop the transport forgets everything at once.
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        let outcome = h.dev.surprise_remove(InFlightPolicy::Drop);
        assert!(!outcome.failing && !h.dev.is_failing());
        assert_eq!(h.log.lock().unwrap().shutdowns, 1);
        assert!(!h.dev.is_activated());
    }

    #[test]
    fn invalid_queue_needs_reset() {
        let mut h = harness();
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        h.program_vector(0, 0x40);
        h.negotiate(VERSION_1);
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0);
        // Rings past the end of guest memory.
        h.setup_queue(0, 256, MEMORY_SIZE as u64 - 0x800, 1);
        h.group.take();
        let generation = h.common8(COMMON_CONFIG_GENERATION);
        h.driver_ok();
        assert!(h.log.lock().unwrap().activations.is_empty());
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(!h.dev.is_activated());
        assert_eq!(h.group.take(), vec![MsiEvent::Trigger(0)]);
        assert_eq!(h.read(ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
        assert_ne!(h.common8(COMMON_CONFIG_GENERATION), generation);
        // The driver cannot clear DEVICE_NEEDS_RESET, only reset.
        h.driver_ok();
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
        h.set_status(0);
        assert_eq!(h.status(), 0);
        assert_eq!(h.log.lock().unwrap().resets, 0, "never activated");

        // Misaligned rings are invalid too.
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0008, 1);
        h.driver_ok();
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn activate_failure_needs_reset() {
        let mut h = harness_with(vec![256, 128], VERSION_1, true);
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, VIRTIO_MSI_NO_VECTOR);
        h.driver_ok();
        assert_eq!(h.log.lock().unwrap().activations.len(), 1);
        assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(!h.dev.is_activated());
        // MSI-X is off: only the ISR says what happened.
        assert_eq!(h.read(ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
        h.set_status(0);
        assert_eq!(h.log.lock().unwrap().resets, 1);
    }

    #[test]
    fn feature_negotiation() {
        let ring_reset = 1u64 << VIRTIO_F_RING_RESET;
        let packed = 1u64 << VIRTIO_F_RING_PACKED;
        // A device that forgot VERSION_1 and offers what the transport cannot do.
        let mut h = harness_with(vec![256, 128], BLK_F_FLUSH | ring_reset | packed, false);
        h.write(COMMON_DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(h.common32(COMMON_DEVICE_FEATURE), 1, "VERSION_1 only");
        // A feature that is not offered: FEATURES_OK refused.
        let status = h.negotiate(VERSION_1 | ring_reset);
        assert_eq!(status & status::FEATURES_OK, 0);
        assert_eq!(status, status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK without FEATURES_OK does not activate.
        h.driver_ok();
        assert_eq!(h.status() & (status::FEATURES_OK | status::DRIVER_OK), 0);
        assert!(h.log.lock().unwrap().activations.is_empty());
        // No VERSION_1: refused.
        assert_eq!(h.negotiate(BLK_F_FLUSH) & status::FEATURES_OK, 0);
        // A subset with VERSION_1: accepted; later feature writes are ignored.
        assert_ne!(
            h.negotiate(VERSION_1 | BLK_F_FLUSH) & status::FEATURES_OK,
            0
        );
        h.write(COMMON_DRIVER_FEATURE_SELECT, 4, 0);
        h.write(COMMON_DRIVER_FEATURE, 4, 0);
        assert_eq!(h.common32(COMMON_DRIVER_FEATURE), BLK_F_FLUSH as u32);
        h.setup_queue(0, 256, 0x1_0000, VIRTIO_MSI_NO_VECTOR);
        h.driver_ok();
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations[0].0, VERSION_1 | BLK_F_FLUSH);
        assert!(!log.activations[0].1[0].event_idx);
    }

    #[test]
    fn failed_status_blocks_activation() {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, VIRTIO_MSI_NO_VECTOR);
        h.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::FAILED);
        assert_ne!(h.status() & status::FAILED, 0);
        h.driver_ok();
        assert_eq!(h.status() & status::DRIVER_OK, 0);
        assert!(h.log.lock().unwrap().activations.is_empty());
        // DEVICE_NEEDS_RESET is not the driver's to set.
        h.set_status(0);
        h.set_status(status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET);
        assert_eq!(h.status(), status::ACKNOWLEDGE);
    }

    #[test]
    fn queue_register_rules() {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.write(COMMON_QUEUE_SELECT, 2, 1);
        // Sizes: a power of two up to the maximum.
        for bad in [0u64, 3, 100, 256, 0xffff] {
            h.write(COMMON_QUEUE_SIZE, 2, bad);
            assert_eq!(h.common16(COMMON_QUEUE_SIZE), 128, "size {bad}");
        }
        h.write(COMMON_QUEUE_SIZE, 2, 1);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 1);
        // Vectors the table does not have read back as NO_VECTOR.
        h.write(COMMON_QUEUE_MSIX_VECTOR, 2, 3);
        assert_eq!(h.common16(COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0x7fff);
        assert_eq!(h.common16(COMMON_CONFIG_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
        h.write(COMMON_QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(h.common16(COMMON_QUEUE_MSIX_VECTOR), 2);
        // queue_enable: 0 ignored, then set; configuration frozen once enabled.
        h.write(COMMON_QUEUE_ENABLE, 2, 0);
        assert_eq!(h.common16(COMMON_QUEUE_ENABLE), 0);
        h.write(COMMON_QUEUE_DESC, 8, 0x1234_5678_9abc_def0);
        assert_eq!(h.read(COMMON_QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
        h.write(COMMON_QUEUE_ENABLE, 2, 1);
        assert_eq!(h.common16(COMMON_QUEUE_ENABLE), 1);
        h.write(COMMON_QUEUE_DESC, 4, 0);
        h.write(COMMON_QUEUE_SIZE, 2, 2);
        assert_eq!(h.read(COMMON_QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 1);
        // A queue that does not exist: size 0, writes ignored.
        h.write(COMMON_QUEUE_SELECT, 2, 2);
        assert_eq!(h.common16(COMMON_QUEUE_SELECT), 2);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 0);
        h.write(COMMON_QUEUE_SIZE, 2, 4);
        h.write(COMMON_QUEUE_ENABLE, 2, 1);
        h.write(COMMON_QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(h.common16(COMMON_QUEUE_SIZE), 0);
        assert_eq!(h.common16(COMMON_QUEUE_ENABLE), 0);
        assert_eq!(h.common16(COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
        // Read-only fields ignore writes.
        h.write(COMMON_QUEUE_SELECT, 2, 0);
        h.write(COMMON_NUM_QUEUES, 2, 9);
        h.write(COMMON_QUEUE_NOTIFY_OFF, 2, 9);
        h.write(COMMON_CONFIG_GENERATION, 1, 9);
        h.write(COMMON_DEVICE_FEATURE, 4, 0);
        h.write(ISR_CFG_OFFSET, 1, 0xff);
        assert_eq!(h.common16(COMMON_NUM_QUEUES), 2);
        assert_eq!(h.common16(COMMON_QUEUE_NOTIFY_OFF), 0);
        assert_eq!(h.common8(COMMON_CONFIG_GENERATION), 0);
        assert_eq!(h.read(ISR_CFG_OFFSET, 1), 0);
        // Wrong-width accesses read zero and are ignored.
        assert_eq!(h.read(COMMON_NUM_QUEUES, 4), 0);
        assert_eq!(h.read(COMMON_DEVICE_STATUS, 2), 0);
        h.write(COMMON_DEVICE_STATUS, 2, 0);
        assert_ne!(h.status(), 0, "a 16-bit write is not a reset");
        assert_eq!(h.read(COMMON_QUEUE_DESC + 2, 4), 0);
        assert_eq!(h.read(COMMON_CFG_SIZE, 2), 0);
    }

    #[test]
    fn msix_through_config_space_and_bar() {
        let mut h = harness();
        let cap = h.msix_cap();
        // Table size is read-only; Enable and Function Mask are writable.
        let _ = h.cfg_write(cap + 2, 2, 0xffff);
        assert_eq!(h.cfg_read(cap + 2, 2), 0xc002);
        let _ = h.cfg_write(cap + 3, 1, 0x80);
        assert_eq!(h.cfg_read(cap + 2, 2), 0x8002);
        h.negotiate(VERSION_1);
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        let interrupt = h.interrupt();
        h.group.take();
        // Vector 1 is still masked (reset state): the interrupt pends.
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(h.group.take().is_empty());
        assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0b10);
        assert_eq!(h.read(MSIX_PBA_OFFSET + 1, 1), 0);
        h.write(MSIX_PBA_OFFSET, 8, 0);
        assert_eq!(h.read(MSIX_PBA_OFFSET, 4), 0b10, "PBA is read-only");
        // Unmasking sends it.
        h.program_vector(1, 0x51);
        let events = h.group.take();
        assert_eq!(events.last(), Some(&MsiEvent::Trigger(1)));
        assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0);
        // Per-vector mask through a qword write of data + control.
        h.write(MSIX_TABLE_OFFSET + 16 + 8, 8, (1 << 32) | 0x51);
        assert_eq!(h.read(MSIX_TABLE_OFFSET + 16 + 12, 4), 1);
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(h.read(MSIX_PBA_OFFSET, 1), 0b10);
        // Function mask, then MSI-X off: queue interrupts fall back to the ISR bit.
        h.set_msix_control(0);
        h.group.take();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(h.group.take().is_empty());
        assert_eq!(h.read(ISR_CFG_OFFSET, 1), u64::from(ISR_QUEUE));
        // Reset clears pending bits.
        h.set_status(0);
        assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0);
    }

    #[test]
    fn notify_region() {
        let mut h = harness();
        let fds = h.dev.ioeventfds(0x1000_0000);
        assert_eq!(fds.len(), 2);
        // Misaligned or past the queues: nothing.
        h.write(NOTIFY_CFG_OFFSET + 2, 2, 0);
        h.write(NOTIFY_CFG_OFFSET + 8, 2, 0);
        h.write(NOTIFY_CFG_OFFSET + 0xffc, 4, 0);
        assert!(fds.iter().all(|f| f.2.read().is_err()));
        // Any width at the address.
        h.write(NOTIFY_CFG_OFFSET, 4, 0);
        h.write(NOTIFY_CFG_OFFSET, 1, 0);
        assert_eq!(fds[0].2.read().unwrap(), 2);
        assert_eq!(h.read(NOTIFY_CFG_OFFSET, 2), 0);
        // A BAR near the top of the address space produces no wrapped address.
        assert!(h.dev.ioeventfds(u64::MAX - 0x1000).is_empty());
    }

    #[test]
    fn device_config_is_forwarded() {
        let mut h = harness();
        assert_eq!(h.read(DEVICE_CFG_OFFSET + 6, 2), 0x1817);
        assert_eq!(h.read(DEVICE_CFG_OFFSET + 7, 4), 0x18);
        assert_eq!(h.read(DEVICE_CFG_OFFSET + 0xfff, 1), 0);
        h.write(DEVICE_CFG_OFFSET + 3, 1, 0xab);
        assert_eq!(h.log.lock().unwrap().config_writes, vec![(3, vec![0xab])]);
    }

    #[test]
    fn pci_cfg_capability_window() {
        let mut h = harness();
        let cap = h.vendor_caps()[4].0;
        let data = cap + VIRTIO_PCI_CFG_CAP_DATA;
        // Read num_queues through the window.
        let _ = h.cfg_write(cap + VIRTIO_CAP_BAR, 1, 0);
        let _ = h.cfg_write(cap + VIRTIO_CAP_OFFSET, 4, COMMON_NUM_QUEUES);
        let _ = h.cfg_write(cap + VIRTIO_CAP_LENGTH, 4, 2);
        assert_eq!(h.cfg_read(data, 2), 2);
        // Write device_status through the window.
        let _ = h.cfg_write(cap + VIRTIO_CAP_OFFSET, 4, COMMON_DEVICE_STATUS);
        let _ = h.cfg_write(cap + VIRTIO_CAP_LENGTH, 4, 1);
        let _ = h.cfg_write(data, 4, status::ACKNOWLEDGE.into());
        assert_eq!(h.status(), status::ACKNOWLEDGE);
        // Invalid windows do nothing.
        for (bar, offset, length) in [(1, 0x14, 1), (0, 0x15, 2), (0, 0x14, 3), (0, BAR0_SIZE, 4)] {
            let _ = h.cfg_write(cap + VIRTIO_CAP_BAR, 1, bar);
            let _ = h.cfg_write(cap + VIRTIO_CAP_OFFSET, 4, offset);
            let _ = h.cfg_write(cap + VIRTIO_CAP_LENGTH, 4, length);
            let _ = h.cfg_write(data, 4, 0);
            assert_eq!(h.status(), status::ACKNOWLEDGE);
        }
    }

    #[test]
    fn too_many_queues_or_bad_sizes() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mmap = GuestRam::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let memory = GuestMemoryAtomic::new(mmap);
        let group: Arc<dyn MsiInterruptGroup> = Arc::new(RecordingGroup::default());
        let fake = |max_sizes: Vec<u16>| {
            Box::new(FakeDevice {
                log: log.clone(),
                max_sizes,
                features: VERSION_1,
                fail_activate: false,
            })
        };
        assert!(matches!(
            VirtioPciDevice::new(fake(vec![8; MAX_QUEUES + 1]), memory.clone(), group.clone()),
            Err(VirtioPciError::TooManyQueues(_))
        ));
        let mut dev =
            VirtioPciDevice::new(fake(vec![8; MAX_QUEUES]), memory.clone(), group.clone()).unwrap();
        assert_eq!(dev.msix_vectors(), 512);
        let mut b = [0u8; 2];
        dev.bar_read(0, NOTIFY_CFG_OFFSET + 4 * (MAX_QUEUES as u64 - 1), &mut b);
        // Invalid maximum sizes make the queue unavailable.
        let mut dev = VirtioPciDevice::new(fake(vec![0, 3, 8]), memory, group).unwrap();
        assert_eq!(dev.ioeventfds(0x1000_0000).len(), 1);
        for (queue, size) in [(0u16, 0u16), (1, 0), (2, 8)] {
            dev.bar_write(0, COMMON_QUEUE_SELECT, &queue.to_le_bytes());
            dev.bar_read(0, COMMON_QUEUE_SIZE, &mut b);
            assert_eq!(u16::from_le_bytes(b), size);
        }
    }

    /// Every access width 0..=8 at every offset of BAR 0 (and past it), read and written with
    /// all-ones and zeros, in every device state the writes lead to: no panic.
    #[test]
    fn hostile_bar_accesses_never_panic() {
        let mut h = harness();
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        h.negotiate(VERSION_1);
        h.setup_queue(0, 256, 0x1_0000, 1);
        h.driver_ok();
        for len in 0..=8usize {
            for offset in 0..BAR0_SIZE + 16 {
                let mut buf = [0u8; 8];
                h.dev.bar_read(0, offset, &mut buf[..len]);
                if offset >= BAR0_SIZE {
                    assert!(buf[..len].iter().all(|&b| b == 0xff));
                }
                h.dev.bar_write(0, offset, &[0xff; 8][..len]);
                h.dev.bar_read(0, offset, &mut buf[..len]);
                h.dev.bar_write(0, offset, &[0; 8][..len]);
            }
        }
        let mut buf = [0u8; 64];
        for bar in [0usize, 1, 5, 6, usize::MAX] {
            for offset in [0, 0x14, BAR0_SIZE - 1, u64::MAX - 3, u64::MAX] {
                h.dev.bar_read(bar, offset, &mut buf);
                h.dev.bar_write(bar, offset, &buf.clone());
            }
        }
    }

    /// Every access width 0..=8 at every configuration space offset, read and written: no panic.
    #[test]
    fn hostile_config_accesses_never_panic() {
        let mut h = harness();
        for len in 0..=8usize {
            for offset in 0..(CONFIG_SPACE_SIZE as u16 + 16) {
                let mut buf = [0u8; 8];
                h.dev.config_read(offset, &mut buf[..len]);
                let _ = h.dev.config_write(offset, &[0xff; 8][..len]);
                h.dev.config_read(offset, &mut buf[..len]);
                let _ = h.dev.config_write(offset, &[0; 8][..len]);
            }
        }
        let mut big = [0u8; 64];
        h.dev.config_read(u16::MAX, &mut big);
        let _ = h.dev.config_write(u16::MAX - 1, &big);
        // The identity survived.
        assert_eq!(h.cfg_read(0, 4), 0x1042_1af4);
    }

    /// Saved active and paused, restored into a function built the same way: the driver reads
    /// the same registers, the MSI-X routes are programmed, the device is active on the same
    /// queues, and the state saved again is the same.
    #[test]
    fn saved_and_restored_into_a_function_built_the_same_way() {
        let mut h = harness();
        h.set_msix_control(MSIX_CONTROL_ENABLE);
        h.program_vector(0, 0x40);
        h.program_vector(1, 0x41);
        h.negotiate(VERSION_1 | EVENT_IDX);
        h.write(COMMON_CONFIG_MSIX_VECTOR, 2, 0);
        h.setup_queue(0, 128, 0x1_0000, 1);
        h.driver_ok();
        let _ = h.cfg_write(
            COMMAND,
            2,
            (COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).into(),
        );
        let err = h.dev.state().unwrap_err();
        assert!(err.reason.contains("paused"), "{err}");
        h.dev.pause();
        let state = h.dev.state().unwrap();
        assert!(state.activated);

        let mut d = harness();
        d.dev.restore(&state).unwrap();
        let message = |data| MsiMessage {
            address: 0xfee0_0000,
            data,
        };
        let updates = d.group.take();
        assert!(updates.contains(&MsiEvent::Update(0, message(0x40), true)));
        assert!(updates.contains(&MsiEvent::Update(1, message(0x41), true)));
        {
            let (saw, was) = (d.log.lock().unwrap(), h.log.lock().unwrap());
            assert_eq!(saw.activations, was.activations, "same features and queues");
        }
        assert_eq!(d.dev.state().unwrap(), state);
        for offset in (0..0x38).step_by(2) {
            assert_eq!(
                d.read(offset, 2),
                h.read(offset, 2),
                "common config {offset:#x}"
            );
        }
        for offset in (0..CONFIG_SPACE_SIZE as u16).step_by(4) {
            assert_eq!(
                d.cfg_read(offset, 4),
                h.cfg_read(offset, 4),
                "config {offset:#x}"
            );
        }
        assert!(d.dev.is_activated());
        d.dev.resume();
        assert!(d.dev.state().is_err(), "running again");

        // A function offering other features, or other queues, is refused and unchanged.
        for mut other in [
            harness_with(vec![256, 128], VERSION_1, false),
            harness_with(vec![256, 64], VERSION_1 | EVENT_IDX | BLK_F_FLUSH, false),
        ] {
            assert!(other.dev.restore(&state).is_err());
            other.dev.pause();
            assert!(!other.dev.state().unwrap().activated);
        }
    }
}
