//! Fuzzes a PCI Express root port: arbitrary guest configuration reads and writes (any offset,
//! any length) interleaved with the VMM's slot operations (cold plug, insert, attention button,
//! surprise removal, removal). Besides never panicking, after every step:
//!
//! - every byte but the slot, link and power-state registers changed exactly as the writable
//!   and RW1C masks say (read-only bits never change, RW1C bits clear only where a 1 was
//!   written), and the masks themselves did not change;
//! - Slot Control, Slot Status and Link Status read what the slot model holds, Presence Detect
//!   State is the card's presence and Data Link Layer Link Active the link's state;
//! - a guest write never clears a Slot Status event it did not write a 1 to;
//! - Command Completed is never set on a slot without Command Completed support;
//! - the power state is D0 or D3hot;
//! - the interrupt is asserted exactly when an event is pending (PCIe 5.0 §6.7.3.4), an MSI is
//!   sent only while MSI is enabled and an event pending, and one is sent when the pending set
//!   goes from empty to not empty with MSI enabled, or MSI is enabled while it is asserted.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::interrupt::{MsiMessage, MsiSink};
use devices::pci::root_port::{PCI_EXP_LNKSTA, PCI_EXP_SLTCTL, PCI_EXP_SLTSTA};
use devices::pci::slot::{LNKSTA_DLLLA, SLTSTA_CC, SLTSTA_EVENTS, SLTSTA_PDS};
use devices::pci::{PciDevice, PcieRootPort, RootPortOptions};
use hotplug_vmm_fuzz::{access_len, check_masked_write, ConfigSnapshot};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Msis(AtomicUsize);

impl MsiSink for Msis {
    fn send(&self, _message: MsiMessage) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u16, len: u8 },
    Write { offset: u16, len: u8, value: u64 },
    ColdPlug,
    Insert,
    Button,
    Surprise,
    Remove,
}

#[derive(Arbitrary, Debug)]
struct Input {
    native_hotplug: bool,
    no_command_completed: bool,
    ops: Vec<Op>,
}

/// Offsets near the registers that matter, more often than a uniform u16 would give them.
fn offset(port: &PcieRootPort, raw: u16) -> u16 {
    match raw >> 13 {
        0 | 1 => raw % 0x40,
        2 | 3 => port.pcie_capability_offset() + raw % 0x40,
        4 => port.msi_capability_offset() + raw % 0x10,
        5 => port.pm_capability_offset() + raw % 0x8,
        _ => raw,
    }
}

fn pending(port: &PcieRootPort) -> bool {
    port.slot().pending_events() != 0
}

fuzz_target!(|input: Input| {
    let msis = Arc::new(Msis::default());
    let options = RootPortOptions {
        native_hotplug: input.native_hotplug,
        no_command_completed: input.no_command_completed,
        port_number: 3,
    };
    let mut port = PcieRootPort::new("rp0", 1, options, msis.clone());
    let cap = port.pcie_capability_offset();
    let pm = port.pm_capability_offset();
    let owned = |o: usize| {
        let o = o as u16;
        (cap + PCI_EXP_LNKSTA..cap + PCI_EXP_LNKSTA + 2).contains(&o)
            || (cap + PCI_EXP_SLTCTL..cap + PCI_EXP_SLTSTA + 2).contains(&o)
            || (pm + 4..pm + 6).contains(&o)
    };
    for op in input.ops.iter().take(256) {
        let before = ConfigSnapshot::of(port.config());
        let (pending_before, msi_before) = (pending(&port), port.msi_enabled());
        let status_before = port.config().read_u16(cap + PCI_EXP_SLTSTA);
        let sent_before = msis.0.load(Ordering::Relaxed);
        match *op {
            Op::Read { offset: raw, len } => {
                let at = offset(&port, raw);
                let mut data = vec![0u8; access_len(len)];
                port.config_read(at, &mut data);
                let mut want = vec![0u8; data.len()];
                port.config().read(at, &mut want);
                assert_eq!(data, want, "read at {at:#x}");
            }
            Op::Write {
                offset: raw,
                len,
                value,
            } => {
                let at = offset(&port, raw);
                let data = &value.to_le_bytes()[..access_len(len)];
                let result = port.config_write(at, data);
                assert!(result.is_empty(), "a bridge without BARs reprogrammed one");
                let after = ConfigSnapshot::of(port.config());
                check_masked_write(&before, &after, at, data, owned);
                // RW1C: events the write did not clear are still there.
                let status = port.config().read_u16(cap + PCI_EXP_SLTSTA);
                let start = usize::from(at);
                let mut cleared = 0u16;
                for (i, &b) in data.iter().enumerate() {
                    let o = start + i;
                    if o == usize::from(cap + PCI_EXP_SLTSTA) {
                        cleared |= u16::from(b);
                    } else if o == usize::from(cap + PCI_EXP_SLTSTA) + 1 {
                        cleared |= u16::from(b) << 8;
                    }
                }
                if start + data.len() > 4096 || data.is_empty() {
                    cleared = 0;
                }
                let kept = status_before & SLTSTA_EVENTS & !cleared;
                assert_eq!(
                    status & kept,
                    kept,
                    "writing {data:02x?} at {at:#x} cleared events {:#x} it did not write a 1 to",
                    kept & !status
                );
            }
            Op::ColdPlug => {
                let _ = port.cold_plug_card();
            }
            Op::Insert => {
                let _ = port.insert_card();
            }
            Op::Button => port.press_attention_button(),
            Op::Surprise => {
                let _ = port.surprise_remove();
            }
            Op::Remove => {
                let _ = port.remove_card();
            }
        }
        // The registers are the slot's.
        let slot = port.slot();
        let config = port.config();
        let status = config.read_u16(cap + PCI_EXP_SLTSTA);
        assert_eq!(config.read_u16(cap + PCI_EXP_SLTCTL), slot.slot_control());
        assert_eq!(status, slot.slot_status());
        assert_eq!(status & SLTSTA_PDS != 0, slot.is_present());
        let link = config.read_u16(cap + PCI_EXP_LNKSTA);
        assert_eq!(link & LNKSTA_DLLLA != 0, slot.is_link_active());
        if input.no_command_completed {
            assert_eq!(status & SLTSTA_CC, 0, "Command Completed without support");
        }
        let power_state = config.read_u16(pm + 4) & 0x3;
        assert!(matches!(power_state, 0 | 3), "power state D{power_state}");
        // §6.7.3.4.
        let pending_after = pending(&port);
        assert_eq!(port.slot().interrupt_asserted(), pending_after);
        let sent = msis.0.load(Ordering::Relaxed) - sent_before;
        let msi_after = port.msi_enabled();
        if sent > 0 {
            assert!(
                msi_after && pending_after,
                "MSI sent while nothing pending or MSI off ({op:?})"
            );
        }
        if msi_after && pending_after && (!msi_before || !pending_before) {
            assert!(sent > 0, "no MSI for a newly pending event ({op:?})");
        }
    }
});
