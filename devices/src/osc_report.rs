//! The `_OSC` report registers: where the host bridge's `_OSC` method (built by the `acpi`
//! crate's `host_bridge` module) tells the VMM what the guest asked for and what it was granted.
//!
//! `_OSC` is pure AML: the platform's answer is computed inside the guest's ACPI interpreter and
//! the VMM never sees the negotiation. These registers make it visible. Every evaluation of the
//! method for the PCI host bridge UUID (PCI Firmware Specification 3.3 §4.5) writes, in this
//! order, the status dword the OS passed (CDW1, whose bit 0 says "query only"), the support
//! dword (CDW2), the control dword the OS requested (CDW3 on entry) and the control dword the
//! platform granted. The write of the granted register completes an evaluation.
//!
//! Linux asks with the query flag first, and asks again, without it, for what it was offered;
//! the last evaluation without the query flag is what the OS now controls. A guest that never
//! commits (Linux does not when it requests no control at all, as with `pcie_aspm=off`) leaves
//! only queries behind: it controls nothing.
//!
//! # Register block
//!
//! Sixteen consecutive I/O ports, four 32-bit registers; only aligned 32-bit accesses are
//! decoded (the AML declares the fields `DWordAcc`), anything else reads all-ones and its write
//! is dropped. Reads return what was last written.
//!
//! | offset | name | meaning |
//! | --- | --- | --- |
//! | 0x0 | [`REG_STATUS`] | CDW1 as the OS passed it |
//! | 0x4 | [`REG_SUPPORT`] | CDW2: the features the OS supports |
//! | 0x8 | [`REG_REQUESTED`] | CDW3 on entry: the control the OS requested |
//! | 0xC | [`REG_GRANTED`] | CDW3 on return: the control granted; writing it completes an evaluation |

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

pub use platform::osc_report::{
    CDW1_QUERY, OSC_REPORT_PORTS, REG_GRANTED, REG_REQUESTED, REG_STATUS, REG_SUPPORT,
};

/// One evaluation of the host bridge's `_OSC`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OscEvaluation {
    /// CDW1 had the query flag: the OS only asked what it would get.
    pub query: bool,
    /// CDW2: what the OS supports (ASPM, MSI, extended config space, ...).
    pub support: u32,
    /// CDW3 on entry: the control the OS requested.
    pub requested: u32,
    /// CDW3 on return: the control granted.
    pub granted: u32,
}

/// What the guest's `_OSC` evaluations reported. See the module documentation.
///
/// It has no handles, so it is its own saved state ([`state`](Self::state),
/// [`restore`](Self::restore)).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OscReport {
    status: u32,
    support: u32,
    requested: u32,
    granted: u32,
    evaluations: u64,
    last: Option<OscEvaluation>,
    committed: Option<OscEvaluation>,
    ignored_accesses: u64,
}

impl OscReport {
    /// Registers with nothing reported yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many evaluations completed (queries included).
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// The last evaluation, query or not.
    pub fn last(&self) -> Option<OscEvaluation> {
        self.last
    }

    /// The last evaluation without the query flag: what the OS now controls. `None` if the OS
    /// never committed (it controls nothing then).
    pub fn committed(&self) -> Option<OscEvaluation> {
        self.committed
    }

    /// Accesses of the wrong size or alignment, which were ignored.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    /// The registers and what was reported so far, to save.
    pub fn state(&self) -> OscReport {
        self.clone()
    }

    /// Puts a saved report back: the registers as the guest left them (an evaluation may be
    /// half written) and what it reported before.
    pub fn restore(&mut self, state: &OscReport) {
        self.clone_from(state);
    }

    fn decode(&mut self, offset: PioAddressOffset, len: usize) -> Option<u16> {
        crate::dword_registers::decode(offset, len, OSC_REPORT_PORTS, &mut self.ignored_accesses)
    }
}

impl MutDevicePio for OscReport {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = match self.decode(offset, data.len()) {
            Some(REG_STATUS) => self.status,
            Some(REG_SUPPORT) => self.support,
            Some(REG_REQUESTED) => self.requested,
            Some(_) => self.granted,
            None => {
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(reg) = self.decode(offset, data.len()) else {
            return;
        };
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match reg {
            REG_STATUS => self.status = value,
            REG_SUPPORT => self.support = value,
            REG_REQUESTED => self.requested = value,
            _ => {
                self.granted = value;
                let evaluation = OscEvaluation {
                    query: self.status & CDW1_QUERY != 0,
                    support: self.support,
                    requested: self.requested,
                    granted: value,
                };
                self.evaluations += 1;
                self.last = Some(evaluation);
                if !evaluation.query {
                    self.committed = Some(evaluation);
                }
                log::debug!("_OSC evaluated: {evaluation:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: PioAddress = PioAddress(0x610);

    fn write(r: &mut OscReport, offset: u16, value: u32) {
        r.pio_write(B, offset, &value.to_le_bytes());
    }

    fn evaluate(r: &mut OscReport, cdw1: u32, support: u32, requested: u32, granted: u32) {
        write(r, REG_STATUS, cdw1);
        write(r, REG_SUPPORT, support);
        write(r, REG_REQUESTED, requested);
        write(r, REG_GRANTED, granted);
    }

    #[test]
    fn query_then_commit() {
        let mut r = OscReport::new();
        assert_eq!((r.evaluations(), r.last(), r.committed()), (0, None, None));
        // Linux: query for 0x1f, offered 0x1d (no SHPC hotplug), commit 0x1d.
        evaluate(&mut r, CDW1_QUERY, 0x1f, 0x1f, 0x1d);
        assert_eq!(r.committed(), None, "a query grants nothing");
        assert!(r.last().unwrap().query);
        evaluate(&mut r, 0, 0x1f, 0x1d, 0x1d);
        let c = r.committed().unwrap();
        assert_eq!(
            (c.query, c.support, c.requested, c.granted),
            (false, 0x1f, 0x1d, 0x1d)
        );
        assert_eq!(r.evaluations(), 2);
        // A later query does not undo the commit.
        evaluate(&mut r, CDW1_QUERY, 0x1f, 0, 0);
        assert_eq!(r.committed(), Some(c));
        assert_eq!(r.last().unwrap().requested, 0);
    }

    #[test]
    fn only_granted_completes_an_evaluation() {
        let mut r = OscReport::new();
        write(&mut r, REG_STATUS, 0);
        write(&mut r, REG_REQUESTED, 0x1d);
        assert_eq!(r.evaluations(), 0);
        write(&mut r, REG_GRANTED, 0x1c);
        assert_eq!(r.committed().unwrap().granted, 0x1c);
        // Reads return what was written.
        let mut d = [0u8; 4];
        r.pio_read(B, REG_REQUESTED, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1d);
        r.pio_read(B, REG_GRANTED, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1c);
    }

    #[test]
    fn wrong_sizes_and_offsets_are_ignored() {
        let mut r = OscReport::new();
        for (offset, len) in [
            (0u16, 1usize),
            (1, 4),
            (2, 2),
            (0xC, 2),
            (0xD, 1),
            (0x10, 4),
            (0xFFFF, 4),
        ] {
            let mut d = vec![0u8; len];
            r.pio_read(B, offset, &mut d);
            assert!(d.iter().all(|&b| b == 0xff), "read {offset:#x}/{len}");
            r.pio_write(B, offset, &vec![0u8; len]);
        }
        r.pio_write(B, REG_GRANTED, &[]);
        assert_eq!(r.evaluations(), 0);
        assert_eq!(r.ignored_accesses(), 15);
    }
}
