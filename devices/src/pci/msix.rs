//! MSI-X: the capability, the vector table and the Pending Bit Array of one function (PCI Local
//! Bus Spec 3.0 §6.8.2).
//!
//! [`Msix`] holds the state the guest programs — the MSI-X Enable and Function Mask bits of the
//! capability's Message Control register, one 16-byte table entry per vector (§6.8.2.6–§6.8.2.9)
//! and the pending bits (§6.8.2.10) — and delivers vectors through a [`MsiInterruptGroup`]:
//!
//! - a vector is *enabled* when MSI-X is enabled, the function is not masked and the vector's own
//!   Mask bit is clear;
//! - [`Msix::trigger`] on an enabled vector calls [`MsiInterruptGroup::trigger`]; on a vector that
//!   is masked (per vector or by the Function Mask) it sets the vector's pending bit instead, and
//!   the message goes out when the vector is unmasked (§6.8.2.9, "Pending bits");
//! - with MSI-X disabled, a trigger is dropped: the function would use INTx, and the pending bits
//!   only record masked messages;
//! - every change of a vector's message or of whether it is enabled calls
//!   [`MsiInterruptGroup::update`], so that a KVM VMM can keep its GSI routes (and irqfds) in step
//!   with the table.
//!
//! The state sits behind a [`Mutex`]: the table is written from a vCPU thread while a device's
//! I/O thread triggers vectors. The trigger path takes the lock and allocates nothing; the lock is
//! held across the [`MsiInterruptGroup`] call so that a route update and a delivery never cross.
//!
//! # Access sizes
//!
//! Only aligned dword and aligned qword accesses to the table and PBA are architecturally defined
//! (§6.8.2, "MSI-X Table and PBA accesses"). This model serves:
//!
//! - reads of any size at any offset, byte by byte from the registers (bytes past the end of the
//!   table or PBA read zero);
//! - table writes that are an aligned dword or an aligned qword; every other write is ignored;
//! - no PBA writes: the PBA is read-only.
//!
//! The capability itself lives in the function's configuration space (the owner adds
//! [`MsixCapability::body`] with [`MsixCapability::WRITABLE`] to its
//! [`PciConfiguration`](crate::pci::PciConfiguration)) and reports every change of the Message
//! Control register to [`Msix::set_message_control`].

use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use crate::interrupt::{MsiInterruptGroup, MsiMessage};
use crate::pci::device::lock;
use crate::state::StateError;

// ---- The capability (PCI Local Bus Spec 3.0 §6.8.2.1–§6.8.2.5) ----

/// Length of the MSI-X capability structure in configuration space.
pub const MSIX_CAP_LEN: usize = 12;
/// Message Control (16 bits), offset in the capability. §6.8.2.3.
pub const MSIX_CAP_MESSAGE_CONTROL: u16 = 0x02;
/// Table Offset/Table BIR (32 bits), offset in the capability. §6.8.2.4.
pub const MSIX_CAP_TABLE: u16 = 0x04;
/// PBA Offset/PBA BIR (32 bits), offset in the capability. §6.8.2.5.
pub const MSIX_CAP_PBA: u16 = 0x08;
/// Message Control: Table Size field (bits 10:0, RO), encoded as N - 1. §6.8.2.3.
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;
/// Message Control: Function Mask (bit 14, RW). §6.8.2.3.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: MSI-X Enable (bit 15, RW). §6.8.2.3.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Table/PBA Offset registers: BIR field (bits 2:0). §6.8.2.4, §6.8.2.5.
pub const MSIX_BIR_MASK: u32 = 0x7;
/// The most vectors an MSI-X table can have (an 11-bit N - 1 field).
pub const MSIX_MAX_VECTORS: u16 = 2048;

// ---- The table (§6.8.2.6–§6.8.2.9) and the PBA (§6.8.2.10) ----

/// Size of one table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Message Address (low dword) in an entry. §6.8.2.6.
pub const MSIX_ENTRY_ADDRESS_LOW: u64 = 0x0;
/// Message Upper Address in an entry. §6.8.2.7.
pub const MSIX_ENTRY_ADDRESS_HIGH: u64 = 0x4;
/// Message Data in an entry. §6.8.2.8.
pub const MSIX_ENTRY_DATA: u64 = 0x8;
/// Vector Control in an entry. §6.8.2.9.
pub const MSIX_ENTRY_VECTOR_CONTROL: u64 = 0xc;
/// Vector Control: Mask Bit (bit 0, RW, set after reset); bits 31:1 are reserved, read zero.
pub const MSIX_VECTOR_CONTROL_MASK: u32 = 1;

/// Where a function's MSI-X table and PBA are and how many vectors it has: the contents of the
/// capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Number of vectors, 1..=[`MSIX_MAX_VECTORS`].
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Guest-writable bits of the capability body: Function Mask and MSI-X Enable.
    pub const WRITABLE: [u8; 4] = [0, 0, 0, 0xc0];

    /// The capability as laid out in configuration space, header bytes (ID and next pointer) zero
    /// for [`PciConfiguration::add_capability_with_masks`](crate::pci::PciConfiguration::add_capability_with_masks)
    /// to fill in. MSI-X starts disabled and unmasked (§6.8.2.3: both bits reset to 0).
    pub fn body(&self) -> [u8; MSIX_CAP_LEN] {
        let vectors = self.vectors.clamp(1, MSIX_MAX_VECTORS);
        let control = (vectors - 1) & MSIX_CONTROL_TABLE_SIZE;
        let table =
            (self.table_offset & !MSIX_BIR_MASK) | (u32::from(self.table_bar) & MSIX_BIR_MASK);
        let pba = (self.pba_offset & !MSIX_BIR_MASK) | (u32::from(self.pba_bar) & MSIX_BIR_MASK);
        let mut body = [0u8; MSIX_CAP_LEN];
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&table.to_le_bytes());
        body[8..12].copy_from_slice(&pba.to_le_bytes());
        body
    }

    /// Size in bytes of a table of `vectors` entries.
    pub fn table_size(vectors: u16) -> u64 {
        u64::from(vectors) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size in bytes of the PBA for `vectors` vectors: one bit each, in whole qwords.
    pub fn pba_size(vectors: u16) -> u64 {
        u64::from(vectors).div_ceil(64) * 8
    }
}

/// Errors in building an [`Msix`] (device-model bugs, never guest-triggered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsixError {
    /// The vector count is 0 or above [`MSIX_MAX_VECTORS`].
    #[error("invalid MSI-X vector count {0}")]
    VectorCount(u16),
}

/// What [`Msix::trigger`] did with a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixDelivery {
    /// The message was sent.
    Sent,
    /// The vector is masked: its pending bit is set, the message goes out on unmask.
    Pending,
    /// MSI-X is disabled: nothing was sent or recorded.
    Disabled,
    /// The vector does not exist in the table.
    NoSuchVector,
}

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    vector_control: u32,
}

impl Entry {
    /// The reset state (§6.8.2.9: the Mask bit is set after reset; the rest is zero).
    const RESET: Entry = Entry {
        address_low: 0,
        address_high: 0,
        data: 0,
        vector_control: MSIX_VECTOR_CONTROL_MASK,
    };

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_high) << 32) | u64::from(self.address_low),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.vector_control & MSIX_VECTOR_CONTROL_MASK != 0
    }

    /// The dword at `offset` (a multiple of 4 below 16).
    fn dword(&self, offset: u64) -> u32 {
        match offset {
            MSIX_ENTRY_ADDRESS_LOW => self.address_low,
            MSIX_ENTRY_ADDRESS_HIGH => self.address_high,
            MSIX_ENTRY_DATA => self.data,
            _ => self.vector_control,
        }
    }

    fn set_dword(&mut self, offset: u64, value: u32) {
        match offset {
            MSIX_ENTRY_ADDRESS_LOW => self.address_low = value,
            MSIX_ENTRY_ADDRESS_HIGH => self.address_high = value,
            MSIX_ENTRY_DATA => self.data = value,
            // Reserved bits 31:1 read zero.
            _ => self.vector_control = value & MSIX_VECTOR_CONTROL_MASK,
        }
    }
}

#[derive(Debug)]
struct State {
    enabled: bool,
    function_masked: bool,
    table: Vec<Entry>,
    /// One bit per vector, as the PBA's qwords.
    pending: Vec<u64>,
}

impl State {
    fn vector_enabled(&self, entry: &Entry) -> bool {
        self.enabled && !self.function_masked && !entry.masked()
    }

    fn is_pending(&self, vector: usize) -> bool {
        self.pending
            .get(vector / 64)
            .is_some_and(|word| word & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(word) = self.pending.get_mut(vector / 64) {
            if pending {
                *word |= 1 << (vector % 64);
            } else {
                *word &= !(1 << (vector % 64));
            }
        }
    }
}

/// The MSI-X state of one function. See the module documentation.
pub struct Msix {
    state: Mutex<State>,
    group: Arc<dyn MsiInterruptGroup>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `vectors` vectors (1..=[`MSIX_MAX_VECTORS`]) delivered through `group`; MSI-X disabled,
    /// every vector masked with a zero message, nothing pending.
    pub fn new(vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::VectorCount(vectors));
        }
        let state = State {
            enabled: false,
            function_masked: false,
            table: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
        };
        Ok(Msix {
            state: Mutex::new(state),
            group,
        })
    }

    /// Number of vectors in the table.
    pub fn vectors(&self) -> u16 {
        // At most MSIX_MAX_VECTORS entries, checked in `new`.
        lock(&self.state).table.len() as u16
    }

    /// Whether MSI-X is enabled in Message Control.
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// Whether the Function Mask is set in Message Control.
    pub fn function_masked(&self) -> bool {
        lock(&self.state).function_masked
    }

    /// Vector `vector`'s message and Mask bit, or `None` if there is no such vector.
    pub fn entry(&self, vector: u16) -> Option<(MsiMessage, bool)> {
        let state = lock(&self.state);
        let entry = state.table.get(usize::from(vector))?;
        Some((entry.message(), entry.masked()))
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        lock(&self.state).is_pending(usize::from(vector))
    }

    /// The guest changed Message Control (the value now in configuration space): applies MSI-X
    /// Enable and Function Mask, updates the routes whose state changed and sends the messages
    /// that were pending on vectors this unmasks.
    pub fn set_message_control(&self, control: u16) {
        let mut state = lock(&self.state);
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if enabled == state.enabled && function_masked == state.function_masked {
            return;
        }
        let was_live = state.enabled && !state.function_masked;
        state.enabled = enabled;
        state.function_masked = function_masked;
        for vector in 0..state.table.len() {
            let entry = state.table[vector];
            let was_enabled = was_live && !entry.masked();
            let now_enabled = state.vector_enabled(&entry);
            if was_enabled != now_enabled {
                self.update(vector, &entry, now_enabled);
                if now_enabled {
                    self.deliver_pending(&mut state, vector);
                }
            }
        }
    }

    /// A guest read of the table at `offset` (relative to the table's start). Any size, any
    /// offset; bytes outside the table read zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.state);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let vector = usize::try_from(o / MSIX_TABLE_ENTRY_SIZE).ok()?;
                    let entry = state.table.get(vector)?;
                    let within = o % MSIX_TABLE_ENTRY_SIZE;
                    let dword = entry.dword(within & !3);
                    Some(dword.to_le_bytes()[(within & 3) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// A guest write to the table at `offset` (relative to the table's start). Only an aligned
    /// dword or an aligned qword inside the table takes effect; anything else is ignored.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let aligned = match data.len() {
            4 => offset.is_multiple_of(4),
            8 => offset.is_multiple_of(8),
            _ => false,
        };
        let vector = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).unwrap_or(usize::MAX);
        let mut state = lock(&self.state);
        if !aligned || vector >= state.table.len() {
            log::debug!(
                "MSI-X: ignoring table write of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        }
        let old = state.table[vector];
        let was_enabled = state.vector_enabled(&old);
        let mut entry = old;
        let within = offset % MSIX_TABLE_ENTRY_SIZE;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut dword = [0u8; 4];
            dword.copy_from_slice(chunk);
            entry.set_dword(within + 4 * i as u64, u32::from_le_bytes(dword));
        }
        state.table[vector] = entry;
        let now_enabled = state.vector_enabled(&entry);
        if entry.message() != old.message() || was_enabled != now_enabled {
            self.update(vector, &entry, now_enabled);
        }
        if now_enabled && !was_enabled {
            self.deliver_pending(&mut state, vector);
        }
    }

    /// A guest read of the PBA at `offset` (relative to the PBA's start). Any size, any offset;
    /// bytes outside the PBA read zero.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.state);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let word = state.pending.get(usize::try_from(o / 8).ok()?)?;
                    Some(word.to_le_bytes()[(o % 8) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// A guest write to the PBA: ignored, the PBA is read-only (§6.8.2.10).
    pub fn write_pba(&self, offset: u64, data: &[u8]) {
        log::debug!(
            "MSI-X: ignoring PBA write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    /// Sends vector `vector` now if it is enabled, or records it as pending if it is masked. See
    /// [`MsixDelivery`]. Errors only when the hypervisor fails to deliver.
    pub fn trigger(&self, vector: u16) -> io::Result<MsixDelivery> {
        let mut state = lock(&self.state);
        let index = usize::from(vector);
        let Some(entry) = state.table.get(index).copied() else {
            return Ok(MsixDelivery::NoSuchVector);
        };
        if !state.enabled {
            return Ok(MsixDelivery::Disabled);
        }
        if state.function_masked || entry.masked() {
            state.set_pending(index, true);
            return Ok(MsixDelivery::Pending);
        }
        self.group.trigger(vector)?;
        Ok(MsixDelivery::Sent)
    }

    /// Clears every pending bit (e.g. when the device behind the function is reset and the
    /// events that set them no longer mean anything).
    pub fn clear_pending(&self) {
        lock(&self.state).pending.fill(0);
    }

    fn update(&self, vector: usize, entry: &Entry, enabled: bool) {
        // `vector` indexes a table of at most MSIX_MAX_VECTORS entries.
        let vector = vector as u16;
        if let Err(e) = self.group.update(vector, entry.message(), enabled) {
            // The guest writes the table: a message the host refuses is the guest's to repeat.
            crate::guest_log::report(
                "MSI-X vector refused",
                log::Level::Warn,
                format_args!("MSI-X: updating vector {vector} failed: {e}"),
            );
        }
    }

    /// Sends vector `vector`'s pending message, if any, now that it is enabled.
    fn deliver_pending(&self, state: &mut State, vector: usize) {
        if state.is_pending(vector) {
            state.set_pending(vector, false);
            if let Err(e) = self.group.trigger(vector as u16) {
                log::warn!("MSI-X: delivering pending vector {vector} failed: {e}");
            }
        }
    }
}

/// The saved state of an [`Msix`]: enable and function mask, the table and the pending bits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// MSI-X Enable.
    pub enabled: bool,
    /// Function Mask.
    pub function_masked: bool,
    /// Each vector's table entry: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// The Pending Bit Array, as its qwords.
    pub pending: Vec<u64>,
}

impl Msix {
    /// The table, the PBA and the enables now.
    pub fn state(&self) -> MsixState {
        let state = lock(&self.state);
        MsixState {
            enabled: state.enabled,
            function_masked: state.function_masked,
            table: state
                .table
                .iter()
                .map(|e| [e.address_low, e.address_high, e.data, e.vector_control])
                .collect(),
            pending: state.pending.clone(),
        }
    }

    /// Puts `state` back and programs every vector's route through the interrupt group as the
    /// restored table says (enabled or not). Refused, changing nothing, if the vector count
    /// differs. Pending messages stay pending: they go out when the guest unmasks them.
    pub fn restore(&self, state: &MsixState) -> Result<(), StateError> {
        let mut current = lock(&self.state);
        crate::state::expect_same(
            "MSI-X",
            "vector count",
            state.table.len(),
            current.table.len(),
        )?;
        crate::state::expect_same(
            "MSI-X",
            "pending-bit words",
            state.pending.len(),
            current.pending.len(),
        )?;
        current.enabled = state.enabled;
        current.function_masked = state.function_masked;
        for (entry, saved) in current.table.iter_mut().zip(&state.table) {
            entry.address_low = saved[0];
            entry.address_high = saved[1];
            entry.data = saved[2];
            entry.vector_control = saved[3] & MSIX_VECTOR_CONTROL_MASK;
        }
        current.pending.copy_from_slice(&state.pending);
        for (vector, entry) in current.table.iter().enumerate() {
            self.update(vector, entry, current.vector_enabled(entry));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a fake [`MsiInterruptGroup`] saw.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum MsiEvent {
        Update(u16, MsiMessage, bool),
        Trigger(u16),
    }

    /// Records every call.
    #[derive(Default)]
    pub(crate) struct RecordingGroup {
        pub(crate) events: Mutex<Vec<MsiEvent>>,
    }

    impl RecordingGroup {
        pub(crate) fn take(&self) -> Vec<MsiEvent> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl MsiInterruptGroup for RecordingGroup {
        fn update(&self, vector: u16, message: MsiMessage, enabled: bool) -> io::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(MsiEvent::Update(vector, message, enabled));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.events.lock().unwrap().push(MsiEvent::Trigger(vector));
            Ok(())
        }
    }

    fn msix(vectors: u16) -> (Msix, Arc<RecordingGroup>) {
        let group = Arc::new(RecordingGroup::default());
        (Msix::new(vectors, group.clone()).unwrap(), group)
    }

    fn write32(m: &Msix, offset: u64, value: u32) {
        m.write_table(offset, &value.to_le_bytes());
    }

    fn read32(m: &Msix, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read_table(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs vector `v` as Linux does: address, data, then unmask.
    fn program(m: &Msix, v: u64, address: u64, data: u32) {
        write32(m, v * 16, address as u32);
        write32(m, v * 16 + 4, (address >> 32) as u32);
        write32(m, v * 16 + 8, data);
        write32(m, v * 16 + 12, 0);
    }

    #[test]
    fn capability_body() {
        let cap = MsixCapability {
            vectors: 3,
            table_bar: 0,
            table_offset: 0x4000,
            pba_bar: 2,
            pba_offset: 0x6000,
        };
        let body = cap.body();
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x6002);
        assert_eq!(MsixCapability::table_size(3), 48);
        assert_eq!(MsixCapability::pba_size(3), 8);
        assert_eq!(MsixCapability::pba_size(65), 16);
        assert!(Msix::new(0, Arc::new(RecordingGroup::default())).is_err());
        assert!(Msix::new(2049, Arc::new(RecordingGroup::default())).is_err());
    }

    #[test]
    fn reset_state_and_readback() {
        let (m, group) = msix(2);
        assert_eq!(m.vectors(), 2);
        assert!(!m.enabled());
        assert!(!m.function_masked());
        for v in 0..2 {
            assert_eq!(read32(&m, v * 16 + 12), 1, "masked after reset");
            assert_eq!(read32(&m, v * 16), 0);
        }
        program(&m, 1, 0xfee0_1000_0000_0000 | 0xfee0_0000, 0x4041);
        assert_eq!(read32(&m, 16), 0xfee0_0000);
        assert_eq!(read32(&m, 20), 0xfee0_1000);
        assert_eq!(read32(&m, 24), 0x4041);
        assert_eq!(read32(&m, 28), 0);
        // Reserved vector control bits read zero.
        write32(&m, 28, 0xffff_fffe);
        assert_eq!(read32(&m, 28), 0);
        // Qword read of the address and byte reads.
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000_fee0_0000);
        let mut b = [0u8; 1];
        m.read_table(25, &mut b);
        assert_eq!(b[0], 0x40);
        // Past the table: zeros.
        m.read_table(32, &mut q);
        assert_eq!(q, [0; 8]);
        // Qword write of data + vector control (masking it).
        m.write_table(24, &((1u64 << 32) | 0x55).to_le_bytes());
        assert_eq!(read32(&m, 24), 0x55);
        assert_eq!(read32(&m, 28), 1);
        assert_eq!(
            m.entry(1).unwrap(),
            (
                MsiMessage {
                    address: 0xfee0_1000_fee0_0000,
                    data: 0x55
                },
                true
            )
        );
        assert!(m.entry(2).is_none());
        // Updates were reported with enabled = false (MSI-X is off).
        assert!(group
            .take()
            .iter()
            .all(|e| matches!(e, MsiEvent::Update(1, _, false))));
    }

    #[test]
    fn odd_writes_are_ignored() {
        let (m, group) = msix(2);
        for (offset, len) in [
            (0u64, 1usize),
            (0, 2),
            (1, 4),
            (2, 4),
            (4, 8),
            (12, 8),
            (0, 3),
            (0, 16),
        ] {
            m.write_table(offset, &vec![0xff; len]);
        }
        m.write_table(32, &[0; 4]);
        m.write_table(u64::MAX - 3, &[0; 4]);
        assert_eq!(read32(&m, 0), 0);
        assert_eq!(read32(&m, 12), 1);
        assert!(group.take().is_empty());
    }

    #[test]
    fn trigger_respects_enable_and_masks() {
        let (m, group) = msix(2);
        program(&m, 0, 0xfee0_0000, 0x21);
        // Disabled: dropped, not pending.
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Disabled);
        assert!(!m.is_pending(0));
        assert_eq!(m.trigger(7).unwrap(), MsixDelivery::NoSuchVector);
        group.take();
        // Enable: vector 0 (unmasked) goes live, vector 1 (masked) does not change.
        m.set_message_control(MSIX_CONTROL_ENABLE | 1);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x21,
        };
        assert_eq!(group.take(), vec![MsiEvent::Update(0, message, true)]);
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Sent);
        assert_eq!(group.take(), vec![MsiEvent::Trigger(0)]);
        // Vector 1 is masked: pending, delivered on unmask.
        assert_eq!(m.trigger(1).unwrap(), MsixDelivery::Pending);
        assert!(m.is_pending(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.write_pba(0, &[0; 8]);
        assert!(m.is_pending(1));
        assert!(group.take().is_empty());
        write32(&m, 28, 0);
        assert_eq!(
            group.take(),
            vec![
                MsiEvent::Update(1, MsiMessage::default(), true),
                MsiEvent::Trigger(1)
            ]
        );
        assert!(!m.is_pending(1));
        // Function mask: everything pends, delivered when cleared.
        m.set_message_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert!(m.function_masked());
        assert_eq!(
            group.take(),
            vec![
                MsiEvent::Update(0, message, false),
                MsiEvent::Update(1, MsiMessage::default(), false)
            ]
        );
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Pending);
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Pending);
        m.set_message_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert!(group.take().is_empty(), "no change, no update");
        m.set_message_control(MSIX_CONTROL_ENABLE);
        assert_eq!(
            group.take(),
            vec![
                MsiEvent::Update(0, message, true),
                MsiEvent::Trigger(0),
                MsiEvent::Update(1, MsiMessage::default(), true)
            ]
        );
        // Pending cleared by the owner.
        write32(&m, 12, 1);
        assert_eq!(m.trigger(0).unwrap(), MsixDelivery::Pending);
        m.clear_pending();
        assert!(!m.is_pending(0));
        group.take();
        write32(&m, 12, 0);
        assert_eq!(group.take(), vec![MsiEvent::Update(0, message, true)]);
        // Disabling drops routes.
        m.set_message_control(0);
        assert_eq!(group.take().len(), 2);
        assert!(!m.enabled());
    }

    #[test]
    fn many_vectors_pba() {
        let (m, _group) = msix(130);
        m.set_message_control(MSIX_CONTROL_ENABLE);
        assert_eq!(m.trigger(129).unwrap(), MsixDelivery::Pending);
        assert_eq!(m.trigger(64).unwrap(), MsixDelivery::Pending);
        let mut pba = [0u8; 24];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[8..16].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(pba[16..24].try_into().unwrap()), 2);
        let mut past = [0xffu8; 8];
        m.read_pba(24, &mut past);
        assert_eq!(past, [0; 8]);
        m.read_pba(u64::MAX, &mut past);
        m.read_table(u64::MAX, &mut past);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (m, _group) = msix(3);
        m.set_message_control(MSIX_CONTROL_ENABLE);
        for len in 0..=8usize {
            for offset in 0..80u64 {
                let mut buf = [0u8; 8];
                m.read_table(offset, &mut buf[..len]);
                m.read_pba(offset, &mut buf[..len]);
                m.write_table(offset, &[0xff; 8][..len]);
                m.write_table(offset, &[0; 8][..len]);
                m.write_pba(offset, &[0xff; 8][..len]);
            }
        }
        for v in 0..=4 {
            let _ = m.trigger(v);
        }
        let _ = m.trigger(u16::MAX);
    }

    #[test]
    fn restore_programs_every_route_and_keeps_pending_bits() {
        let group = Arc::new(RecordingGroup::default());
        let msix = Msix::new(3, group.clone()).unwrap();
        msix.set_message_control(MSIX_CONTROL_ENABLE);
        for (vector, data) in [(0u64, 0x40u32), (1, 0x41)] {
            let entry = 16 * vector;
            msix.write_table(entry, &0xfee0_0000u32.to_le_bytes());
            msix.write_table(entry + 8, &data.to_le_bytes());
            msix.write_table(entry + 12, &0u32.to_le_bytes());
        }
        // Vector 2 stays masked and gets a message pending.
        msix.write_table(32 + 8, &0x42u32.to_le_bytes());
        assert_eq!(msix.trigger(2).unwrap(), MsixDelivery::Pending);
        let state = msix.state();

        let restored_group = Arc::new(RecordingGroup::default());
        let restored = Msix::new(3, restored_group.clone()).unwrap();
        restored.restore(&state).unwrap();
        assert_eq!(restored.state(), state);
        let message = |data| MsiMessage {
            address: 0xfee0_0000,
            data,
        };
        assert_eq!(
            restored_group.take(),
            vec![
                MsiEvent::Update(0, message(0x40), true),
                MsiEvent::Update(1, message(0x41), true),
                MsiEvent::Update(
                    2,
                    MsiMessage {
                        address: 0,
                        data: 0x42
                    },
                    false
                ),
            ]
        );
        assert!(restored.is_pending(2));
        assert_eq!(restored.trigger(1).unwrap(), MsixDelivery::Sent);
        // Unmasking delivers the pending message, as before the save.
        restored.write_table(32 + 12, &0u32.to_le_bytes());
        assert!(restored_group.take().contains(&MsiEvent::Trigger(2)));

        // Another vector count is refused, changing nothing.
        let small = Msix::new(2, Arc::new(RecordingGroup::default())).unwrap();
        let before = small.state();
        assert!(small.restore(&state).is_err());
        assert_eq!(small.state(), before);
    }
}
