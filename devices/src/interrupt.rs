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

impl MsiMessage {
    /// The delivery mode: bits 10:8 of the data (Intel SDM Vol. 3A §11.11.2, "Message Data
    /// Register Format").
    pub fn delivery_mode(&self) -> u8 {
        ((self.data >> 8) & 7) as u8
    }

    /// Why a machine without firmware must not deliver this message, if it must not; `None`
    /// for the fixed, lowest-priority and NMI deliveries a driver programs.
    ///
    /// The rest could only end the guest, never serve it: an INIT puts the vCPU at the reset
    /// vector, where this machine has no firmware (the hostile-guest test's random
    /// configuration writes did exactly that, and the VMM stopped on the emulation failure that
    /// followed); an SMI needs SMM, which the machine does not offer; an ExtINT needs an 8259
    /// to answer the acknowledge cycle; modes 3 and 6 are reserved.
    pub fn refusal(&self) -> Option<&'static str> {
        match self.delivery_mode() {
            0 | 1 | 4 => None,
            2 => Some("SMI delivery mode (the machine has no SMM)"),
            5 => Some("INIT delivery mode (it would reset a vCPU; the machine has no firmware)"),
            7 => Some("ExtINT delivery mode (the machine has no 8259 to answer it)"),
            _ => Some("a reserved delivery mode"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fixed_lowest_priority_and_nmi_messages_are_delivered() {
        let with_mode = |mode: u32| MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041 | mode << 8,
        };
        for mode in 0..8 {
            let m = with_mode(mode);
            assert_eq!(u32::from(m.delivery_mode()), mode);
            assert_eq!(
                m.refusal().is_none(),
                [0, 1, 4].contains(&mode),
                "mode {mode}"
            );
        }
        assert!(with_mode(5).refusal().unwrap().contains("INIT"));
        // Bits outside 10:8 do not change the mode.
        let m = MsiMessage {
            address: 0,
            data: 0xffff_f8ff,
        };
        assert_eq!(m.refusal(), None);
    }
}
