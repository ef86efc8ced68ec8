//! How devices raise interrupts without knowing the hypervisor: the one place for the three
//! kinds a device here raises.
//!
//! - [`InterruptLine`]: an edge on a platform interrupt pin (a 16550's IRQ 4, the Generic Event
//!   Device's GSI). On KVM an `EventFd` registered as an irqfd.
//! - [`MsiSink`]: one MSI whose address and data the guest programmed into an MSI capability
//!   (a root port's hot-plug interrupt). On KVM, `KVM_SIGNAL_MSI`.
//! - [`MsiInterruptGroup`]: the vectors of an MSI-X table ([`crate::pci::msix`]), whose routes
//!   follow the table as the guest programs it. On KVM, GSI routes and irqfds.
//!
//! A unit test backs each with a counter or a recorder.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An edge-triggered interrupt line into the platform's interrupt controller.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An [`InterruptLine`] that only counts how often it fired: for tests and examples.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    count: AtomicUsize,
}

impl CountingInterrupt {
    /// How often [`InterruptLine::trigger`] was called.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl InterruptLine for CountingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high dwords combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// The hypervisor's MSI delivery for one device: a group of vectors.
///
/// The transport calls [`MsiInterruptGroup::update`] from the vCPU thread whenever the guest
/// changes a vector's message or mask state, and [`MsiInterruptGroup::trigger`] from whichever
/// thread has an interrupt to deliver (the device's I/O thread for used-buffer notifications).
/// Masking and the Pending Bit Array are handled by the transport: `trigger` is only called for
/// an unmasked vector with MSI-X enabled.
pub trait MsiInterruptGroup: Send + Sync {
    /// Vector `vector` now carries `message`; `enabled` is false while it is masked or MSI-X is
    /// disabled (a KVM VMM may then drop the route).
    fn update(&self, vector: u16, message: MsiMessage, enabled: bool) -> io::Result<()>;
    /// Delivers vector `vector`'s message now.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

/// Where the port's hot-plug MSI goes: the hypervisor (on KVM, `KVM_SIGNAL_MSI`).
pub trait MsiSink: Send + Sync {
    /// Delivers one MSI with the address and data the guest programmed.
    fn send(&self, message: MsiMessage) -> io::Result<()>;
}
