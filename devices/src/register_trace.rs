//! Tracing the guest's accesses to hot-plug registers.
//!
//! A researcher wants to see exactly what the guest's hot-plug driver did and when: each read
//! of Slot Status, each Slot Control command, each poll of the link, each access the ACPI
//! methods make to the hot-plug controller. Devices that hold such registers take an optional
//! [`RegisterTracer`] and report every guest access to them, with the value the guest read or
//! wrote and, for writes, the register's value afterwards. Where the trace goes (a file of JSON
//! lines, a ring buffer, a test's vector) is the VMM's business.

/// One guest access to a hot-plug register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterAccess<'a> {
    /// The device holding the register (a root port's id, `"acpi-hotplug"`).
    pub device: &'a str,
    /// The register, as its specification names it (e.g. `"SLTCTL"`).
    pub register: &'static str,
    /// Whether the guest wrote the register (else it read it).
    pub write: bool,
    /// The value the guest read, or the value it wrote (bytes it did not write are 0).
    pub value: u32,
    /// For a write: the register's value afterwards (read-only and write-1-to-clear bits
    /// applied, side effects such as Command Completed included).
    pub after: Option<u32>,
}

/// Hears every guest access to a device's hot-plug registers. Called on the thread of the
/// guest's access (a vCPU) with the device locked: keep it short and do not lock the device.
pub trait RegisterTracer: Send + Sync {
    /// The guest made `access`.
    fn access(&self, access: &RegisterAccess<'_>);
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    /// One access as recorded: (device, register, write, value, after).
    pub type Record = (String, &'static str, bool, u32, Option<u32>);

    /// A tracer that keeps what it hears.
    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<Record>>);

    impl Recorder {
        /// Takes what was recorded so far.
        pub fn take(&self) -> Vec<Record> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl RegisterTracer for Recorder {
        fn access(&self, a: &RegisterAccess<'_>) {
            self.0.lock().unwrap().push((
                a.device.to_string(),
                a.register,
                a.write,
                a.value,
                a.after,
            ));
        }
    }
}
