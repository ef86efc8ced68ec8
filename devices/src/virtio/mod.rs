//! Virtio 1.x devices and their modern virtio-pci transport (Virtio 1.2, §4.1).
//!
//! The split mirrors the specification: a [`VirtioDevice`] (e.g. virtio-blk, §5.2) knows its
//! feature bits, its device-specific configuration and how to serve its queues; the transport
//! ([`pci::VirtioPciDevice`]) owns everything the driver negotiates through the PCI capabilities —
//! device status, feature selection, queue sizes and addresses, MSI-X vectors — and hands the
//! device ready [`Queue`]s when the driver sets DRIVER_OK.
//!
//! Nothing here depends on KVM. The hypervisor side comes in through two small traits:
//! [`MsiInterruptGroup`](crate::interrupt::MsiInterruptGroup) delivers MSI-X messages (a KVM VMM backs each vector with an irqfd and a
//! GSI route) and the queue notification [`EventFd`]s, which a KVM VMM registers as ioeventfds
//! on the notify addresses the transport reports, so that a guest's queue kick never runs device
//! code on a vCPU thread.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod pci;

/// Guest RAM as the devices see it: every write they make into it is marked in a dirty
/// bitmap, so that a live migration resends the pages a device wrote (KVM's dirty log sees
/// only the vCPUs' writes).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Guest memory as devices see it: swapped atomically by the VMM if the layout ever changes.
pub type GuestMemory = GuestMemoryAtomic<GuestRam>;

/// Virtio device status bits (Virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged all the features it understands.
    pub const FEATURES_OK: u8 = 8;
    /// The device has experienced an error from which it cannot recover.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// Something went wrong in the guest; it has given up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Feature bits every device of this crate may offer (Virtio 1.2 §6).
pub mod features {
    /// The device uses the descriptor and used-ring event index fields.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    /// Indirect descriptors.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
    /// Compliance with Virtio 1.x: the only mode this crate implements.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
}

/// MSI-X "no vector" (Virtio 1.2 §4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Which interrupt a device raises (Virtio 1.2 §4.1.4.5 and §4.1.5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed.
    Config,
    /// Queue `n` has used buffers.
    Queue(u16),
}

/// How a device raises its interrupts; implemented by the transport, used by the device.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt for `kind` through the vector the driver assigned to it (or sets the
    /// ISR status if MSI-X is off). Errors only on hypervisor failure.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()>;
}

/// What a device pulled out without the driver's knowledge (surprise removal) does with the
/// requests the driver had made available and the device had not completed.
///
/// Either way the requests whose host I/O is under way at that moment finish it first (a read
/// into guest memory cannot be taken back) and then share the others' fate; the backend is
/// released once they have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InFlightPolicy {
    /// Complete every one of them with the device type's I/O error (virtio-blk:
    /// `VIRTIO_BLK_S_IOERR`) — those in the host too, whatever their host I/O did — and raise
    /// the queue interrupts; then go on failing, the same way, every request the driver makes
    /// available until it resets the device. The driver does not learn at once that the
    /// device is gone and may submit more meanwhile (Linux's virtio_blk does until its removal
    /// breaks the virtqueues, and then waits for every request it submitted); failing them
    /// leaves nothing of the driver's waiting on the device, and no process that had a request
    /// in it goes on to issue another as though the disk were still there.
    #[default]
    Fail,
    /// Vanish with them, as hardware pulled from its slot does: no completion is ever
    /// published. A driver without a timeout for its requests waits for them forever (Linux's
    /// virtio_blk does: the removal then hangs in `del_gendisk`).
    Drop,
}

impl InFlightPolicy {
    /// The policy's name on the command line and the control socket.
    pub fn name(self) -> &'static str {
        match self {
            InFlightPolicy::Fail => "fail",
            InFlightPolicy::Drop => "drop",
        }
    }
}

impl std::str::FromStr for InFlightPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(InFlightPolicy::Fail),
            "drop" => Ok(InFlightPolicy::Drop),
            _ => Err(format!("'{s}' is not an in-flight policy (fail, drop)")),
        }
    }
}

/// Where the driver's `used_event` sits (§2.7.10, with `VIRTIO_RING_F_EVENT_IDX`): the last
/// field of the available ring at `avail_ring`, after its flags, its idx and its `size`
/// entries (§2.7.6).
pub(crate) fn used_event_address(avail_ring: u64, size: u16) -> Option<GuestAddress> {
    avail_ring
        .checked_add(4 + 2 * u64::from(size))
        .map(GuestAddress)
}

/// The little-endian `u16` the driver wrote at `at` in guest memory, if it is there.
pub(crate) fn read_le16(mem: &GuestRam, at: GuestAddress) -> Option<u16> {
    mem.read_obj::<u16>(at).ok().map(u16::from_le)
}

/// What a surprise removal did with the requests in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlightOutcome {
    /// Requests completed with an I/O error without being done ([`InFlightPolicy::Fail`]).
    pub failed: u64,
    /// Requests left uncompleted ([`InFlightPolicy::Drop`], or any request whose host I/O
    /// outlasted the removal).
    pub dropped: u64,
    /// Host I/O of requests in flight had not finished when the removal returned (it waits a
    /// short while): the device's thread finishes it alone, publishing nothing more (those
    /// requests are counted in [`dropped`](Self::dropped)), then releases the backend.
    pub host_io_pending: bool,
    /// The device goes on failing every request the driver makes available until the driver
    /// resets it ([`InFlightPolicy::Fail`]): the transport keeps the queues' notifications and
    /// the interrupt vectors connected until then.
    pub failing: bool,
    /// With [`InFlightPolicy::Fail`]: whether the driver had taken every completion the
    /// device published (the failed requests' and any before them) when the removal returned
    /// — the device waits a short while for that, because a driver may ignore a completion it
    /// finds after it learns of the removal (Linux does). `None`: the device cannot tell (the
    /// driver did not negotiate `VIRTIO_RING_F_EVENT_IDX`), or did not wait (the VM is
    /// paused, or the policy is [`InFlightPolicy::Drop`]).
    pub collected: Option<bool>,
}

/// A queue the driver enabled, ready for the device: the `virtio-queue` state (sizes and ring
/// addresses as negotiated, already validated by `Queue::is_valid` against guest memory), the
/// queue's index and the event the transport signals when the driver notifies the queue.
pub struct ActiveQueue {
    /// Queue index as the driver numbers it.
    pub index: u16,
    /// The negotiated queue.
    pub queue: Queue,
    /// Signalled on every driver notification of this queue (ioeventfd on KVM).
    pub notify: Arc<EventFd>,
}

/// Errors of [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device could not start serving its queues.
    #[error("virtio device {id}: {reason}")]
    Failed {
        /// The device's id.
        id: String,
        /// What went wrong.
        reason: String,
    },
}

/// A virtio device behind a transport.
///
/// Every method is reachable by the untrusted guest (through the transport): none may panic on
/// any input. `activate` and `reset` are called from a vCPU thread and must return promptly —
/// request processing belongs on the device's own I/O thread.
pub trait VirtioDevice: Send {
    /// Virtio device ID (§5: 2 for block).
    fn device_type(&self) -> u32;
    /// The device's id (user-given, for logs and the control socket).
    fn id(&self) -> &str;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads device-specific configuration at `offset` (§4.1.4.6); out of range reads zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration at `offset`; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` with the negotiated `features`, reading and writing
    /// `memory` and raising interrupts through `interrupt`.
    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Device reset (§2.4): stop touching guest memory before returning, forget the queues.
    /// Returns once no request of the device is in flight on the guest's memory.
    fn reset(&mut self);

    /// Whether the device has hit an error it cannot recover from without a reset (§2.1.2),
    /// typically a driver bug that breaks a whole queue. While true, the transport reports
    /// [`status::DEVICE_NEEDS_RESET`] in `device_status`; the device raises a
    /// [`VirtioInterruptType::Config`] interrupt when it becomes true. Cleared by `reset`.
    fn needs_reset(&self) -> bool {
        false
    }

    /// The device is going away (hot-unplug, graceful or surprise): stop serving the queues as
    /// `reset` does and release the backend (e.g. close the disk image). The device is never
    /// activated again. The default only resets.
    fn shutdown(&mut self) {
        self.reset();
    }

    /// The device is pulled out without the driver's knowledge (surprise removal): stop
    /// serving the queues, dealing with the requests in flight as `in_flight` says, and release
    /// the backend once the host I/O in flight has finished. Returns promptly even if that
    /// host I/O hangs. Unless the outcome says the device goes on
    /// [`failing`](InFlightOutcome::failing) requests until its `reset`, it publishes nothing
    /// to guest memory once this returns. The device is never activated again. The default is
    /// [`shutdown`](Self::shutdown).
    fn surprise_remove(&mut self, in_flight: InFlightPolicy) -> InFlightOutcome {
        let _ = in_flight;
        self.shutdown();
        InFlightOutcome::default()
    }

    /// After a surprise removal that left the device [`failing`](InFlightOutcome::failing):
    /// from now on fail the driver's requests on the thread that notifies the device
    /// ([`queue_notified`](Self::queue_notified)) instead of the device's own, so that each
    /// answer is published, and its interrupt raised, before the vCPU that notified runs on.
    /// (A driver that learns of the removal on another vCPU meanwhile may ignore an answer that
    /// comes later: Linux's virtio-pci does.) Returns false if the device cannot (the default):
    /// it goes on failing requests on its own thread, notified through its queues' events.
    /// Otherwise the caller stops signalling those events (the VMM unregisters the
    /// ioeventfds) and then has every queue looked at once more, through
    /// [`queue_notified`](Self::queue_notified), for what was notified meanwhile.
    fn fail_on_notify(&mut self) -> bool {
        false
    }

    /// The driver notified queue `index` through a BAR write the transport received. A device
    /// that [fails on notify](Self::fail_on_notify) serves the queue here, on the caller's
    /// thread, and returns true; otherwise (the default) it returns false and the transport
    /// signals the queue's notification event.
    fn queue_notified(&mut self, index: u16) -> bool {
        let _ = index;
        false
    }

    /// The VM pauses (to be saved or migrated): stop serving the queues, finishing and
    /// publishing the requests in flight (with their interrupts), and keep the queues to
    /// [`resume`](Self::resume). Returns where each active queue was left; nothing touches guest
    /// memory once this returns. Idempotent. The default has nothing to pause.
    fn pause(&mut self) -> Vec<QueueProgress> {
        Vec::new()
    }

    /// Serve the queues again after [`pause`](Self::pause) (or
    /// [`restore_active`](Self::restore_active)): the chains the driver made available meanwhile
    /// are served at once. The default has nothing to resume.
    fn resume(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    /// An active device restored from a snapshot: as [`activate`](Self::activate), with the
    /// queues at their saved progress, but paused until [`resume`](Self::resume). `failing`: it
    /// had been pulled out with [`InFlightPolicy::Fail`] and its driver had not reset it yet, so
    /// it goes on failing every request, without a backend. `needs_reset`: it had hit an error
    /// it cannot recover from without a reset. The default activates and pauses, and cannot
    /// restore a failing device.
    fn restore_active(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        features: u64,
        queues: Vec<ActiveQueue>,
        (failing, needs_reset): (bool, bool),
    ) -> Result<(), ActivateError> {
        if failing || needs_reset {
            return Err(ActivateError::Failed {
                id: self.id().to_string(),
                reason: "this device cannot be restored failing or needing a reset".into(),
            });
        }
        self.activate(memory, interrupt, features, queues)?;
        self.pause();
        Ok(())
    }
}

/// Where a paused device left one of its queues: the driver's ring indices it had reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueProgress {
    /// Queue index as the driver numbers it.
    pub index: u16,
    /// The next available ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
}
