//! How devices raise interrupts without knowing the hypervisor.
//!
//! A device model holds an [`InterruptLine`] (an edge on a platform interrupt pin, e.g. a 16550's
//! IRQ 4) and asks it to fire. The VMM backs it with whatever its hypervisor offers — on KVM an
//! `EventFd` registered as an irqfd — and a unit test backs it with a counter.

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
