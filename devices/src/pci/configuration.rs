//! The configuration space of one PCI function: 4 KiB of registers that know, bit by bit, what the
//! guest may change.
//!
//! [`PciConfiguration`] stores the 256 bytes of conventional configuration space (PCI Local Bus
//! Spec 3.0 §6.1) followed by the PCI Express extended configuration space (PCI Express Base Spec
//! 5.0 §7.2.2, §7.6), 4096 bytes in all. Every byte carries two masks:
//!
//! - *writable* bits, which a guest write replaces (RW),
//! - *write-1-to-clear* bits, which a guest write clears where it writes a 1 (RW1C, PCI Express
//!   Base Spec 5.0 §7.4),
//!
//! and every other bit is read-only to the guest. The device model itself changes any bit through
//! the `set_*` methods, which bypass the masks (that is how a device reports status).
//!
//! # Base Address Registers and [`BarReprogram`]
//!
//! A BAR added with [`PciConfiguration::add_bar`] has a writable mask that covers exactly the
//! address bits above its size, so the standard sizing protocol (PCI Local Bus Spec 3.0 §6.2.5.1:
//! write all-ones, read back, restore) works for I/O, 32-bit and 64-bit memory BARs, and for both
//! halves of a 64-bit BAR. The type bits below the address are read-only.
//!
//! A BAR is *decoded* — the function answers accesses to `[address, address + size)` — when all of
//! these hold:
//!
//! 1. the Command register enables its space (Memory Space for memory BARs, I/O Space for I/O BARs);
//! 2. no dword of the BAR last had all-ones written to it by the guest (the guest is sizing the BAR:
//!    a real address is written together with the read-only type bits, which are never all ones);
//! 3. its address is not zero;
//! 4. the region fits its address space: below 64 KiB for I/O BARs (x86 port space; the upper 16
//!    bits of an I/O BAR are hardwired to zero), below 4 GiB for 32-bit memory BARs, and without
//!    wrapping for 64-bit memory BARs.
//!
//! [`PciConfiguration::write`] compares, for every BAR, where it was decoded before the write with
//! where it is decoded afterwards, and returns one [`BarReprogram`] per BAR whose decoding changed
//! (enabled, disabled or moved). The VMM applies them to its MMIO/PIO buses: it removes every `old`
//! mapping first, then adds every `new` one. A write that touches neither the Command register nor
//! a BAR returns nothing, and so does a write that changes nothing.
//!
//! Linux clears Memory Space/I/O Space while it sizes BARs and while it rewrites a 64-bit BAR, so
//! in practice a guest produces one `BarReprogram` per BAR when it enables decoding and one per
//! move. A guest that rewrites a 64-bit BAR dword by dword with decoding enabled produces an
//! intermediate mapping at the half-updated address, as real hardware would decode it.
//!
//! The Expansion ROM BAR is not implemented (it reads as zero, so the guest sees no ROM).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::{expect_same, StateError};

/// Size of a function's configuration space: conventional plus PCI Express extended
/// (PCI Express Base Spec 5.0 §7.2.2).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional configuration space (PCI Local Bus Spec 3.0 §6.1).
pub const CONVENTIONAL_CONFIG_SPACE_SIZE: usize = 256;
/// Number of 32-bit registers in [`CONFIG_SPACE_SIZE`] bytes.
pub const NUM_CONFIG_REGISTERS: usize = CONFIG_SPACE_SIZE / 4;

// ---- Header common to type 0 and type 1 (PCI Local Bus Spec 3.0 §6.1, §6.2) ----

/// Vendor ID (16 bits, RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const VENDOR_ID: u16 = 0x00;
/// Device ID (16 bits, RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const DEVICE_ID: u16 = 0x02;
/// Command register (16 bits). PCI Local Bus Spec 3.0 §6.2.2.
pub const COMMAND: u16 = 0x04;
/// Status register (16 bits). PCI Local Bus Spec 3.0 §6.2.3.
pub const STATUS: u16 = 0x06;
/// Revision ID (8 bits, RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const REVISION_ID: u16 = 0x08;
/// Programming interface byte of the Class Code (RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const PROG_IF: u16 = 0x09;
/// Sub-class byte of the Class Code (RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const SUBCLASS: u16 = 0x0a;
/// Base class byte of the Class Code (RO). PCI Local Bus Spec 3.0 §6.2.1.
pub const CLASS_CODE: u16 = 0x0b;
/// Cache Line Size (8 bits, RW, no effect on PCI Express). PCI Local Bus Spec 3.0 §6.2.4.
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency Timer (8 bits, RO zero on PCI Express). PCI Local Bus Spec 3.0 §6.2.4.
pub const LATENCY_TIMER: u16 = 0x0d;
/// Header Type (8 bits, RO): layout in bits 6:0, multi-function in bit 7. PCI Local Bus Spec 3.0
/// §6.2.1.
pub const HEADER_TYPE: u16 = 0x0e;
/// BIST (8 bits, RO zero: no built-in self test). PCI Local Bus Spec 3.0 §6.2.4.
pub const BIST: u16 = 0x0f;
/// First Base Address Register. PCI Local Bus Spec 3.0 §6.2.5.1.
pub const BAR0: u16 = 0x10;
/// Capabilities Pointer (8 bits, RO). PCI Local Bus Spec 3.0 §6.7.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt Line (8 bits, RW, scratch for software). PCI Local Bus Spec 3.0 §6.2.4.
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt Pin (8 bits, RO: 0 none, 1..=4 INTA#..INTD#). PCI Local Bus Spec 3.0 §6.2.4.
pub const INTERRUPT_PIN: u16 = 0x3d;

// ---- Type 0 header (PCI Local Bus Spec 3.0 §6.1, figure 6-1) ----

/// CardBus CIS Pointer (type 0, RO zero). PCI Local Bus Spec 3.0 §6.2.5.
pub const CARDBUS_CIS_POINTER: u16 = 0x28;
/// Subsystem Vendor ID (type 0, RO). PCI Local Bus Spec 3.0 §6.2.4.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (type 0, RO). PCI Local Bus Spec 3.0 §6.2.4.
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM Base Address (type 0; not implemented, RO zero). PCI Local Bus Spec 3.0 §6.2.5.2.
pub const EXPANSION_ROM_BASE: u16 = 0x30;
/// Min_Gnt (type 0, RO zero on PCI Express). PCI Local Bus Spec 3.0 §6.2.4.
pub const MIN_GNT: u16 = 0x3e;
/// Max_Lat (type 0, RO zero on PCI Express). PCI Local Bus Spec 3.0 §6.2.4.
pub const MAX_LAT: u16 = 0x3f;

// ---- Type 1 header (PCI-to-PCI Bridge Architecture Spec 1.2 §3.2; PCI Express Base Spec 5.0
// §7.5.1.3) ----

/// Primary Bus Number (type 1, RW). PCI-to-PCI Bridge Spec 1.2 §3.2.5.3.
pub const PRIMARY_BUS: u16 = 0x18;
/// Secondary Bus Number (type 1, RW). PCI-to-PCI Bridge Spec 1.2 §3.2.5.4.
pub const SECONDARY_BUS: u16 = 0x19;
/// Subordinate Bus Number (type 1, RW). PCI-to-PCI Bridge Spec 1.2 §3.2.5.5.
pub const SUBORDINATE_BUS: u16 = 0x1a;
/// Secondary Latency Timer (type 1, RO zero on PCI Express). PCI Express Base Spec 5.0 §7.5.1.3.
pub const SECONDARY_LATENCY_TIMER: u16 = 0x1b;
/// I/O Base (type 1): bits 7:4 RW = address bits 15:12; bits 3:0 RO = addressing capability.
/// PCI-to-PCI Bridge Spec 1.2 §3.2.5.6.
pub const IO_BASE: u16 = 0x1c;
/// I/O Limit (type 1), same layout as [`IO_BASE`]. PCI-to-PCI Bridge Spec 1.2 §3.2.5.6.
pub const IO_LIMIT: u16 = 0x1d;
/// Secondary Status (type 1, 16 bits, error bits RW1C). PCI-to-PCI Bridge Spec 1.2 §3.2.5.7.
pub const SECONDARY_STATUS: u16 = 0x1e;
/// Memory Base (type 1, 16 bits): bits 15:4 RW = address bits 31:20. PCI-to-PCI Bridge Spec 1.2
/// §3.2.5.8.
pub const MEMORY_BASE: u16 = 0x20;
/// Memory Limit (type 1), same layout as [`MEMORY_BASE`]. PCI-to-PCI Bridge Spec 1.2 §3.2.5.8.
pub const MEMORY_LIMIT: u16 = 0x22;
/// Prefetchable Memory Base (type 1, 16 bits): bits 15:4 RW = address bits 31:20, bits 3:0 RO
/// `1` = 64-bit. PCI-to-PCI Bridge Spec 1.2 §3.2.5.9.
pub const PREFETCHABLE_MEMORY_BASE: u16 = 0x24;
/// Prefetchable Memory Limit (type 1), same layout as [`PREFETCHABLE_MEMORY_BASE`].
/// PCI-to-PCI Bridge Spec 1.2 §3.2.5.9.
pub const PREFETCHABLE_MEMORY_LIMIT: u16 = 0x26;
/// Prefetchable Base Upper 32 Bits (type 1, RW). PCI-to-PCI Bridge Spec 1.2 §3.2.5.10.
pub const PREFETCHABLE_BASE_UPPER32: u16 = 0x28;
/// Prefetchable Limit Upper 32 Bits (type 1, RW). PCI-to-PCI Bridge Spec 1.2 §3.2.5.10.
pub const PREFETCHABLE_LIMIT_UPPER32: u16 = 0x2c;
/// I/O Base Upper 16 Bits (type 1; RO zero: 16-bit I/O decode). PCI-to-PCI Bridge Spec 1.2
/// §3.2.5.6.
pub const IO_BASE_UPPER16: u16 = 0x30;
/// I/O Limit Upper 16 Bits (type 1; RO zero: 16-bit I/O decode). PCI-to-PCI Bridge Spec 1.2
/// §3.2.5.6.
pub const IO_LIMIT_UPPER16: u16 = 0x32;
/// Expansion ROM Base Address of a type 1 header (not implemented, RO zero). PCI-to-PCI Bridge
/// Spec 1.2 §3.2.5.16.
pub const BRIDGE_EXPANSION_ROM_BASE: u16 = 0x38;
/// Bridge Control (type 1, 16 bits). PCI-to-PCI Bridge Spec 1.2 §3.2.5.18; PCI Express Base Spec
/// 5.0 §7.5.1.3.13.
pub const BRIDGE_CONTROL: u16 = 0x3e;

// ---- Register bits ----

/// Command: I/O Space enable (bit 0). PCI Local Bus Spec 3.0 §6.2.2.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command: Memory Space enable (bit 1).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command: Bus Master enable (bit 2).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: Parity Error Response (bit 6).
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
/// Command: SERR# Enable (bit 8).
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
/// Command: Interrupt Disable (bit 10, INTx).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The Command bits a guest may change; Special Cycles, Memory Write and Invalidate, VGA Palette
/// Snoop, IDSEL Stepping and Fast Back-to-Back are hardwired to zero as PCI Express requires
/// (PCI Express Base Spec 5.0 §7.5.1.1.3).
pub const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;

/// Status: Interrupt Status (bit 3, RO, set by the device while it asserts INTx).
/// PCI Local Bus Spec 3.0 §6.2.3.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: Capabilities List (bit 4, RO), set when the first capability is added.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status: Master Data Parity Error (bit 8, RW1C).
pub const STATUS_MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
/// Status: Signaled Target Abort (bit 11, RW1C).
pub const STATUS_SIGNALED_TARGET_ABORT: u16 = 1 << 11;
/// Status: Received Target Abort (bit 12, RW1C).
pub const STATUS_RECEIVED_TARGET_ABORT: u16 = 1 << 12;
/// Status: Received Master Abort (bit 13, RW1C).
pub const STATUS_RECEIVED_MASTER_ABORT: u16 = 1 << 13;
/// Status: Signaled System Error (bit 14, RW1C; "Received System Error" in Secondary Status).
pub const STATUS_SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
/// Status: Detected Parity Error (bit 15, RW1C).
pub const STATUS_DETECTED_PARITY_ERROR: u16 = 1 << 15;
/// The write-1-to-clear bits of the Status and Secondary Status registers: 8 and 11..=15.
pub const STATUS_W1C: u16 = STATUS_MASTER_DATA_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR;

/// Header Type: multi-function device (bit 7). PCI Local Bus Spec 3.0 §6.2.1.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Header Type layout 0: endpoint.
pub const HEADER_TYPE_ENDPOINT: u8 = 0x00;
/// Header Type layout 1: PCI-to-PCI bridge.
pub const HEADER_TYPE_BRIDGE: u8 = 0x01;

/// BAR bit 0: the BAR maps I/O space. PCI Local Bus Spec 3.0 §6.2.5.1.
pub const BAR_IO_SPACE: u32 = 1 << 0;
/// Memory BAR bits 2:1 = `10b`: 64-bit BAR (the next BAR holds the upper 32 address bits).
pub const BAR_MEMORY_TYPE_64: u32 = 0b10 << 1;
/// Memory BAR bit 3: prefetchable.
pub const BAR_MEMORY_PREFETCHABLE: u32 = 1 << 3;

/// Bridge I/O Base/Limit bits 3:0 = `0h`: 16-bit I/O addressing. PCI-to-PCI Bridge Spec 1.2
/// §3.2.5.6.
pub const BRIDGE_IO_16BIT: u8 = 0x0;
/// Bridge Prefetchable Base/Limit bits 3:0 = `1h`: 64-bit addressing. PCI-to-PCI Bridge Spec 1.2
/// §3.2.5.9.
pub const BRIDGE_PREFETCHABLE_64BIT: u16 = 0x1;
/// Bridge Control: Parity Error Response Enable (bit 0).
pub const BRIDGE_CONTROL_PARITY_ERROR_RESPONSE: u16 = 1 << 0;
/// Bridge Control: SERR# Enable (bit 1).
pub const BRIDGE_CONTROL_SERR_ENABLE: u16 = 1 << 1;
/// Bridge Control: ISA Enable (bit 2).
pub const BRIDGE_CONTROL_ISA_ENABLE: u16 = 1 << 2;
/// Bridge Control: VGA Enable (bit 3).
pub const BRIDGE_CONTROL_VGA_ENABLE: u16 = 1 << 3;
/// Bridge Control: VGA 16-bit Decode (bit 4).
pub const BRIDGE_CONTROL_VGA_16BIT: u16 = 1 << 4;
/// Bridge Control: Secondary Bus Reset (bit 6).
pub const BRIDGE_CONTROL_SECONDARY_BUS_RESET: u16 = 1 << 6;
/// The Bridge Control bits a guest may change. Master Abort Mode, Fast Back-to-Back and the
/// discard timer bits are hardwired to zero as PCI Express requires (PCI Express Base Spec 5.0
/// §7.5.1.3.13).
pub const BRIDGE_CONTROL_WRITABLE: u16 = BRIDGE_CONTROL_PARITY_ERROR_RESPONSE
    | BRIDGE_CONTROL_SERR_ENABLE
    | BRIDGE_CONTROL_ISA_ENABLE
    | BRIDGE_CONTROL_VGA_ENABLE
    | BRIDGE_CONTROL_VGA_16BIT
    | BRIDGE_CONTROL_SECONDARY_BUS_RESET;

// ---- Capabilities ----

/// Offset of the first conventional capability: right after the type 0/1 header.
pub const FIRST_CAPABILITY_OFFSET: u16 = 0x40;
/// Offset of the first PCI Express extended capability. PCI Express Base Spec 5.0 §7.6.1.
pub const FIRST_EXTENDED_CAPABILITY_OFFSET: u16 = 0x100;
/// Capability ID: PCI Power Management. PCI Local Bus Spec 3.0 appendix H.
pub const CAP_ID_POWER_MANAGEMENT: u8 = 0x01;
/// Capability ID: MSI. PCI Local Bus Spec 3.0 §6.8.1.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor specific. PCI Local Bus Spec 3.0 appendix H.
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;
/// Capability ID: bridge Subsystem Vendor ID. PCI Local Bus Spec 3.0 appendix H.
pub const CAP_ID_BRIDGE_SUBSYSTEM: u8 = 0x0d;
/// Capability ID: PCI Express. PCI Express Base Spec 5.0 §7.5.3.
pub const CAP_ID_PCI_EXPRESS: u8 = 0x10;
/// Capability ID: MSI-X. PCI Local Bus Spec 3.0 §6.8.2.
pub const CAP_ID_MSIX: u8 = 0x11;

/// Number of BARs in a type 0 header.
pub const NUM_BARS_TYPE0: usize = 6;
/// Number of BARs in a type 1 header.
pub const NUM_BARS_TYPE1: usize = 2;

/// Which header layout a function has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: an endpoint (or host bridge) with six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge (e.g. a PCI Express root port) with two BARs and bus numbers.
    Bridge,
}

impl HeaderType {
    /// How many BAR slots this layout has.
    pub fn num_bars(self) -> usize {
        match self {
            HeaderType::Endpoint => NUM_BARS_TYPE0,
            HeaderType::Bridge => NUM_BARS_TYPE1,
        }
    }
}

/// What a Base Address Register maps. PCI Local Bus Spec 3.0 §6.2.5.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space: 4..=256 bytes, 16-bit decode.
    Io,
    /// 32-bit memory space: 16 bytes..=2 GiB, below 4 GiB.
    Memory32 {
        /// Reads have no side effects and may be merged (bit 3).
        prefetchable: bool,
    },
    /// 64-bit memory space: 16 bytes..=2^63 bytes; takes this BAR slot and the next one.
    Memory64 {
        /// Reads have no side effects and may be merged (bit 3).
        prefetchable: bool,
    },
}

impl BarKind {
    /// Whether the BAR maps I/O space (otherwise memory space).
    pub fn is_io(self) -> bool {
        matches!(self, BarKind::Io)
    }

    /// Whether the BAR is a prefetchable memory BAR.
    pub fn is_prefetchable(self) -> bool {
        match self {
            BarKind::Io => false,
            BarKind::Memory32 { prefetchable } | BarKind::Memory64 { prefetchable } => prefetchable,
        }
    }

    /// How many BAR slots (dwords) the BAR occupies.
    pub fn slots(self) -> usize {
        match self {
            BarKind::Memory64 { .. } => 2,
            _ => 1,
        }
    }

    /// The read-only type bits in the BAR's low dword.
    fn type_bits(self) -> u32 {
        let prefetch = |p: bool| if p { BAR_MEMORY_PREFETCHABLE } else { 0 };
        match self {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Memory32 { prefetchable } => prefetch(prefetchable),
            BarKind::Memory64 { prefetchable } => BAR_MEMORY_TYPE_64 | prefetch(prefetchable),
        }
    }

    /// Smallest and largest size a BAR of this kind may have.
    fn size_range(self) -> (u64, u64) {
        match self {
            // PCI Local Bus Spec 3.0 §6.2.5.1: I/O BARs should not ask for more than 256 bytes.
            BarKind::Io => (4, 256),
            BarKind::Memory32 { .. } => (16, 1 << 31),
            BarKind::Memory64 { .. } => (16, 1 << 63),
        }
    }

    /// The address space end the BAR must fit below (`None`: the whole 64-bit space).
    fn address_limit(self) -> Option<u64> {
        match self {
            BarKind::Io => Some(1 << 16),
            BarKind::Memory32 { .. } => Some(1 << 32),
            BarKind::Memory64 { .. } => None,
        }
    }

    /// The address bits of the low dword a guest can write for a BAR of `size` bytes.
    fn low_mask(self, size: u64) -> u32 {
        let address_bits = !(size - 1);
        match self {
            BarKind::Io => (address_bits as u32) & 0x0000_fffc,
            BarKind::Memory32 { .. } | BarKind::Memory64 { .. } => {
                (address_bits as u32) & 0xffff_fff0
            }
        }
    }

    /// The address bits of the upper dword of a 64-bit BAR of `size` bytes.
    fn high_mask(size: u64) -> u32 {
        (!(size - 1) >> 32) as u32
    }
}

/// A BAR as the device declared it, with an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index (0..=5 for type 0, 0..=1 for type 1); a 64-bit BAR is named by its low slot.
    pub index: usize,
    /// What the BAR maps.
    pub kind: BarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Guest physical (memory) or port (I/O) address.
    pub address: u64,
}

/// A change in where a BAR is decoded, caused by a guest configuration write. See the module
/// documentation for when a BAR counts as decoded.
///
/// The VMM removes the mapping at `old` (if any) and adds one at `new` (if any). When one write
/// yields several changes, remove every `old` before adding any `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    /// BAR index; a 64-bit BAR is named by its low slot.
    pub index: usize,
    /// What the BAR maps.
    pub kind: BarKind,
    /// Size of the region in bytes.
    pub size: u64,
    /// Where the BAR was decoded before the write, `None` if it was not decoded.
    pub old: Option<u64>,
    /// Where the BAR is decoded after the write, `None` if it is no longer decoded.
    pub new: Option<u64>,
}

/// Identity of a function as its header reports it (PCI Local Bus Spec 3.0 §6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class code (e.g. 0x06 bridge).
    pub class_code: u8,
    /// Sub-class code (e.g. 0x04 PCI-to-PCI bridge).
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Sets the Header Type's multi-function bit: set it on function 0 of a device that has other
    /// functions.
    pub multifunction: bool,
}

/// Errors in building a configuration space (device-model bugs, never guest-triggered).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// The BAR index does not exist in this header (or a 64-bit BAR would not fit).
    #[error("BAR index {0} does not exist in this header")]
    BarIndex(usize),
    /// The BAR slot (or the upper slot of a 64-bit BAR) is already used.
    #[error("BAR slot {0} is already in use")]
    BarInUse(usize),
    /// The BAR size is not a power of two or out of range for its kind.
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    BarSize {
        /// Requested size.
        size: u64,
        /// Requested kind.
        kind: BarKind,
    },
    /// No BAR was added at this index.
    #[error("no BAR at index {0}")]
    NoBar(usize),
    /// The address is not aligned to the BAR's size or does not fit the BAR's address space.
    #[error("address {address:#x} is invalid for BAR {index}")]
    BarAddress {
        /// BAR index.
        index: usize,
        /// Rejected address.
        address: u64,
    },
    /// The capability does not fit in the remaining configuration space.
    #[error("no room for a {len}-byte capability")]
    NoCapabilitySpace {
        /// Length of the capability.
        len: usize,
    },
    /// The capability body is shorter than its header.
    #[error("capability body of {len} bytes is shorter than its {header}-byte header")]
    CapabilityTooShort {
        /// Length of the body.
        len: usize,
        /// Length of the header.
        header: usize,
    },
    /// A mask is longer than the capability body, or a bit is both writable and write-1-to-clear.
    #[error("capability masks do not match the body")]
    CapabilityMasks,
    /// An extended capability version does not fit in 4 bits.
    #[error("extended capability version {0} does not fit in 4 bits")]
    CapabilityVersion(u8),
}

/// One BAR slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    /// Nothing: the slot reads zero and ignores writes.
    Unused,
    /// The low (or only) dword of a BAR.
    Bar { kind: BarKind, size: u64 },
    /// The upper dword of the 64-bit BAR in the previous slot.
    Upper,
}

/// The configuration space of one PCI function. See the module documentation.
#[derive(Clone)]
pub struct PciConfiguration {
    /// Register contents.
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Bits a guest write replaces.
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Bits a guest write of 1 clears.
    w1c: Box<[u8; CONFIG_SPACE_SIZE]>,
    header_type: HeaderType,
    bars: [BarSlot; NUM_BARS_TYPE0],
    /// The raw values the guest last wrote to each BAR dword, read-only bits included, to tell a
    /// sizing probe (all ones) from an address.
    bar_written: [u32; NUM_BARS_TYPE0],
    last_capability: Option<usize>,
    next_capability: usize,
    last_extended_capability: Option<usize>,
    next_extended_capability: usize,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field(
                "vendor_id",
                &format_args!("{:#06x}", self.read_u16(VENDOR_ID)),
            )
            .field(
                "device_id",
                &format_args!("{:#06x}", self.read_u16(DEVICE_ID)),
            )
            .field("header_type", &self.header_type)
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// `offset` rounded up to a multiple of 4.
fn dword_align(offset: usize) -> usize {
    offset.div_ceil(4) * 4
}

/// Whether `[a, a_end)` and `[b, b_end)` overlap.
fn overlaps(a: usize, a_end: usize, b: usize, b_end: usize) -> bool {
    a < b_end && b < a_end
}

impl PciConfiguration {
    fn blank(header_type: HeaderType, identity: &PciIdentity) -> Self {
        let mut config = PciConfiguration {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            w1c: Box::new([0; CONFIG_SPACE_SIZE]),
            header_type,
            bars: [BarSlot::Unused; NUM_BARS_TYPE0],
            bar_written: [0; NUM_BARS_TYPE0],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET as usize,
            last_extended_capability: None,
            next_extended_capability: FIRST_EXTENDED_CAPABILITY_OFFSET as usize,
        };
        let layout = match header_type {
            HeaderType::Endpoint => HEADER_TYPE_ENDPOINT,
            HeaderType::Bridge => HEADER_TYPE_BRIDGE,
        };
        let multifunction = if identity.multifunction {
            HEADER_TYPE_MULTIFUNCTION
        } else {
            0
        };
        config.set_u16(VENDOR_ID, identity.vendor_id);
        config.set_u16(DEVICE_ID, identity.device_id);
        config.set_u8(REVISION_ID, identity.revision_id);
        config.set_u8(PROG_IF, identity.prog_if);
        config.set_u8(SUBCLASS, identity.subclass);
        config.set_u8(CLASS_CODE, identity.class_code);
        config.set_u8(HEADER_TYPE, layout | multifunction);
        config.set_writable_bits(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        config.set_w1c_bits(STATUS, &STATUS_W1C.to_le_bytes());
        config.set_writable_bits(CACHE_LINE_SIZE, &[0xff]);
        config.set_writable_bits(INTERRUPT_LINE, &[0xff]);
        config
    }

    /// A type 0 (endpoint) header: identity and subsystem IDs read-only; Command, Status, Cache
    /// Line Size and Interrupt Line as the spec says; no BARs, no capabilities, Interrupt Pin 0.
    pub fn new_type0(identity: &PciIdentity, subsystem_vendor_id: u16, subsystem_id: u16) -> Self {
        let mut config = Self::blank(HeaderType::Endpoint, identity);
        config.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, subsystem_id);
        config
    }

    /// A type 1 (PCI-to-PCI bridge) header: bus numbers writable; a 16-bit I/O window, a memory
    /// window and a 64-bit prefetchable window, each writable at its granularity and reset to
    /// *disabled* (base above limit) so the guest sees no stray window at address 0; Secondary
    /// Status error bits write-1-to-clear; Bridge Control as [`BRIDGE_CONTROL_WRITABLE`].
    ///
    /// A type 1 header has no Subsystem ID fields; a bridge that wants them adds a
    /// [`CAP_ID_BRIDGE_SUBSYSTEM`] capability.
    pub fn new_type1(identity: &PciIdentity) -> Self {
        let mut config = Self::blank(HeaderType::Bridge, identity);
        config.set_writable_bits(PRIMARY_BUS, &[0xff, 0xff, 0xff]);
        // I/O window: address bits 15:12 in bits 7:4.
        config.set_writable_bits(IO_BASE, &[0xf0, 0xf0]);
        config.set_u8(IO_BASE, 0xf0 | BRIDGE_IO_16BIT);
        config.set_u8(IO_LIMIT, BRIDGE_IO_16BIT);
        config.set_w1c_bits(SECONDARY_STATUS, &STATUS_W1C.to_le_bytes());
        // Memory windows: address bits 31:20 in bits 15:4.
        config.set_writable_bits(MEMORY_BASE, &0xfff0u16.to_le_bytes());
        config.set_writable_bits(MEMORY_LIMIT, &0xfff0u16.to_le_bytes());
        config.set_u16(MEMORY_BASE, 0xfff0);
        config.set_u16(MEMORY_LIMIT, 0);
        config.set_writable_bits(PREFETCHABLE_MEMORY_BASE, &0xfff0u16.to_le_bytes());
        config.set_writable_bits(PREFETCHABLE_MEMORY_LIMIT, &0xfff0u16.to_le_bytes());
        config.set_u16(PREFETCHABLE_MEMORY_BASE, 0xfff0 | BRIDGE_PREFETCHABLE_64BIT);
        config.set_u16(PREFETCHABLE_MEMORY_LIMIT, BRIDGE_PREFETCHABLE_64BIT);
        config.set_writable_bits(PREFETCHABLE_BASE_UPPER32, &[0xff; 4]);
        config.set_writable_bits(PREFETCHABLE_LIMIT_UPPER32, &[0xff; 4]);
        config.set_u32(PREFETCHABLE_BASE_UPPER32, 0xffff_ffff);
        config.set_writable_bits(BRIDGE_CONTROL, &BRIDGE_CONTROL_WRITABLE.to_le_bytes());
        config
    }

    /// The header layout.
    pub fn header_type(&self) -> HeaderType {
        self.header_type
    }

    // ---- Guest accesses ----

    /// A guest read of `data.len()` bytes at `offset`. An access that does not fit entirely in
    /// the 4 KiB space reads all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        match Self::range(offset, data.len()) {
            Some((start, end)) => data.copy_from_slice(&self.data[start..end]),
            None => data.fill(0xff),
        }
    }

    /// A guest write of `data` at `offset`, byte by byte through the writable and
    /// write-1-to-clear masks; read-only bits keep their value. An access that does not fit
    /// entirely in the 4 KiB space is ignored.
    ///
    /// Returns the BARs whose decoding the write changed (see the module documentation).
    #[must_use = "the VMM must move the mappings of reprogrammed BARs"]
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Vec<BarReprogram> {
        let Some((start, end)) = Self::range(offset, data.len()) else {
            return Vec::new();
        };
        let bars_start = BAR0 as usize;
        let bars_end = bars_start + 4 * self.header_type.num_bars();
        let affects_decoding = overlaps(start, end, COMMAND as usize, COMMAND as usize + 2)
            || overlaps(start, end, bars_start, bars_end);
        let before = affects_decoding.then(|| self.decoded_addresses());

        for (i, &value) in data.iter().enumerate() {
            let offset = start + i;
            let old = self.data[offset];
            let writable = self.writable[offset];
            let clear = self.w1c[offset] & value;
            self.data[offset] = ((old & !writable) | (value & writable)) & !clear;
            if (bars_start..bars_end).contains(&offset) {
                let reg = (offset - bars_start) / 4;
                let shift = 8 * ((offset - bars_start) % 4);
                self.bar_written[reg] =
                    (self.bar_written[reg] & !(0xff << shift)) | (u32::from(value) << shift);
            }
        }

        let Some(before) = before else {
            return Vec::new();
        };
        let after = self.decoded_addresses();
        let mut changes = Vec::new();
        for (index, slot) in self.bars.iter().enumerate() {
            if let BarSlot::Bar { kind, size } = *slot {
                if before[index] != after[index] {
                    changes.push(BarReprogram {
                        index,
                        kind,
                        size,
                        old: before[index],
                        new: after[index],
                    });
                }
            }
        }
        changes
    }

    /// `[offset, offset + len)` as indices if non-empty and inside the space.
    fn range(offset: u16, len: usize) -> Option<(usize, usize)> {
        let start = usize::from(offset);
        let end = start.checked_add(len)?;
        (len > 0 && end <= CONFIG_SPACE_SIZE).then_some((start, end))
    }

    // ---- Device-side accessors (no masks) ----

    /// The 32-bit register number `reg_index` (byte offset `4 * reg_index`); all-ones past the end.
    pub fn read_reg(&self, reg_index: usize) -> u32 {
        match reg_index.checked_mul(4).and_then(|o| u16::try_from(o).ok()) {
            Some(offset) => self.read_u32(offset),
            None => 0xffff_ffff,
        }
    }

    /// The byte at `offset`; all-ones past the end.
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// The little-endian 16-bit value at `offset`; all-ones if it does not fit.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// The little-endian 32-bit value at `offset`; all-ones if it does not fit.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets bytes at `offset` regardless of the masks: for the device model, e.g. to report
    /// status in read-only or write-1-to-clear bits. Bytes past the end are dropped.
    pub fn set_bytes(&mut self, offset: u16, bytes: &[u8]) {
        let start = usize::from(offset).min(CONFIG_SPACE_SIZE);
        let len = bytes.len().min(CONFIG_SPACE_SIZE - start);
        if len < bytes.len() {
            log::warn!("PCI config: device-side write past the end at {offset:#x}");
        }
        self.data[start..start + len].copy_from_slice(&bytes[..len]);
        self.sync_bar_written(start, start + len);
    }

    /// Sets the byte at `offset` regardless of the masks.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    /// Sets the little-endian 16-bit value at `offset` regardless of the masks.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets the little-endian 32-bit value at `offset` regardless of the masks.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Makes the bits set in `mask` (bytes from `offset` on) writable by the guest; they stop being
    /// write-1-to-clear. Bits clear in `mask` become read-only unless write-1-to-clear.
    pub fn set_writable_bits(&mut self, offset: u16, mask: &[u8]) {
        let start = usize::from(offset).min(CONFIG_SPACE_SIZE);
        for (i, &m) in mask.iter().take(CONFIG_SPACE_SIZE - start).enumerate() {
            self.writable[start + i] = m;
            self.w1c[start + i] &= !m;
        }
    }

    /// Makes the bits set in `mask` (bytes from `offset` on) write-1-to-clear for the guest; they
    /// stop being writable. Bits clear in `mask` become read-only unless writable.
    pub fn set_w1c_bits(&mut self, offset: u16, mask: &[u8]) {
        let start = usize::from(offset).min(CONFIG_SPACE_SIZE);
        for (i, &m) in mask.iter().take(CONFIG_SPACE_SIZE - start).enumerate() {
            self.w1c[start + i] = m;
            self.writable[start + i] &= !m;
        }
    }

    /// The guest-writable mask of the byte at `offset` (0 past the end).
    pub fn writable_bits(&self, offset: u16) -> u8 {
        self.writable.get(usize::from(offset)).copied().unwrap_or(0)
    }

    /// The write-1-to-clear mask of the byte at `offset` (0 past the end).
    pub fn w1c_bits(&self, offset: u16) -> u8 {
        self.w1c.get(usize::from(offset)).copied().unwrap_or(0)
    }

    // ---- BARs ----

    /// Declares BAR `index` of `size` bytes (a power of two in the kind's range) mapping `kind`.
    /// A 64-bit BAR also takes slot `index + 1`. The BAR starts at address 0, not decoded.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
    ) -> Result<(), PciConfigError> {
        let num_bars = self.header_type.num_bars();
        if index + kind.slots() > num_bars {
            return Err(PciConfigError::BarIndex(index));
        }
        for slot in index..index + kind.slots() {
            if self.bars[slot] != BarSlot::Unused {
                return Err(PciConfigError::BarInUse(slot));
            }
        }
        let (min, max) = kind.size_range();
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciConfigError::BarSize { size, kind });
        }
        let offset = Self::bar_offset(index);
        self.set_u32(offset, kind.type_bits());
        self.set_writable_bits(offset, &kind.low_mask(size).to_le_bytes());
        self.bars[index] = BarSlot::Bar { kind, size };
        if let BarKind::Memory64 { .. } = kind {
            self.set_u32(offset + 4, 0);
            self.set_writable_bits(offset + 4, &BarKind::high_mask(size).to_le_bytes());
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Byte offset of BAR slot `index`.
    fn bar_offset(index: usize) -> u16 {
        // `index` is below NUM_BARS_TYPE0 wherever this is called.
        BAR0 + 4 * index as u16
    }

    /// Sets BAR `index` to `address` regardless of the guest (e.g. for addresses the VMM assigns
    /// at cold plug). Produces no [`BarReprogram`]: the caller maps what it assigns.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), PciConfigError> {
        let (kind, size) = self.bar_slot(index).ok_or(PciConfigError::NoBar(index))?;
        let fits = address
            .checked_add(size)
            .is_some_and(|end| kind.address_limit().is_none_or(|limit| end <= limit));
        if !address.is_multiple_of(size) || !fits {
            return Err(PciConfigError::BarAddress { index, address });
        }
        let offset = Self::bar_offset(index);
        self.set_u32(
            offset,
            (address as u32 & kind.low_mask(size)) | kind.type_bits(),
        );
        if let BarKind::Memory64 { .. } = kind {
            self.set_u32(offset + 4, (address >> 32) as u32);
        }
        Ok(())
    }

    /// Kind and size of the BAR whose low slot is `index`.
    fn bar_slot(&self, index: usize) -> Option<(BarKind, u64)> {
        match self.bars.get(index)? {
            BarSlot::Bar { kind, size } => Some((*kind, *size)),
            _ => None,
        }
    }

    /// The address programmed in BAR `index` whether or not it is decoded; `None` if no BAR starts
    /// at `index` (including the upper slot of a 64-bit BAR).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let (kind, size) = self.bar_slot(index)?;
        let offset = Self::bar_offset(index);
        let low = u64::from(self.read_u32(offset) & kind.low_mask(size));
        Some(match kind {
            BarKind::Memory64 { .. } => low | (u64::from(self.read_u32(offset + 4)) << 32),
            _ => low,
        })
    }

    /// BAR `index` with its programmed address, decoded or not.
    pub fn bar(&self, index: usize) -> Option<BarRegion> {
        let (kind, size) = self.bar_slot(index)?;
        Some(BarRegion {
            index,
            kind,
            size,
            address: self.bar_address(index)?,
        })
    }

    /// Every BAR the device declared, with its programmed address.
    pub fn bars(&self) -> Vec<BarRegion> {
        (0..NUM_BARS_TYPE0).filter_map(|i| self.bar(i)).collect()
    }

    /// Where BAR `index` is decoded now (see the module documentation), or `None`.
    pub fn decoded_bar_address(&self, index: usize) -> Option<u64> {
        let (kind, size) = self.bar_slot(index)?;
        let command = self.read_u16(COMMAND);
        let enable = if kind.is_io() {
            COMMAND_IO_SPACE
        } else {
            COMMAND_MEMORY_SPACE
        };
        if command & enable == 0 {
            return None;
        }
        if self.bar_written[index..index + kind.slots()].contains(&u32::MAX) {
            return None; // the guest is sizing the BAR
        }
        let address = self.bar_address(index)?;
        let end = address.checked_add(size)?;
        if address == 0 || kind.address_limit().is_some_and(|limit| end > limit) {
            return None;
        }
        Some(address)
    }

    /// Every BAR decoded now, at the address it is decoded at: what the VMM must have mapped.
    pub fn decoded_bars(&self) -> Vec<BarRegion> {
        (0..NUM_BARS_TYPE0)
            .filter_map(|index| {
                let (kind, size) = self.bar_slot(index)?;
                Some(BarRegion {
                    index,
                    kind,
                    size,
                    address: self.decoded_bar_address(index)?,
                })
            })
            .collect()
    }

    fn decoded_addresses(&self) -> [Option<u64>; NUM_BARS_TYPE0] {
        std::array::from_fn(|i| self.decoded_bar_address(i))
    }

    /// After a device-side change to `[start, end)`, treat BAR dwords there as written with their
    /// new contents (so a device-side change never looks like a guest sizing probe).
    fn sync_bar_written(&mut self, start: usize, end: usize) {
        for reg in 0..self.header_type.num_bars() {
            let offset = usize::from(Self::bar_offset(reg));
            if overlaps(start, end, offset, offset + 4) {
                self.bar_written[reg] = self.read_reg(offset / 4);
            }
        }
    }

    // ---- Capabilities ----

    /// Appends a read-only conventional capability; see
    /// [`PciConfiguration::add_capability_with_masks`].
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, PciConfigError> {
        self.add_capability_with_masks(id, body, &[], &[])
    }

    /// Appends a conventional capability (PCI Local Bus Spec 3.0 §6.7) and returns its offset.
    ///
    /// `body` is the whole capability as laid out in the spec, starting with its two header bytes
    /// (Capability ID and Next Pointer), which this method fills in, so that indices into `body`,
    /// `writable` and `w1c` are the spec's capability-relative offsets. `writable` and `w1c` give
    /// the guest-writable and write-1-to-clear bits per byte; they may be shorter than `body`
    /// (the rest is read-only) and must not share bits. The header bytes are always read-only.
    ///
    /// Capabilities are placed one after the other from offset 0x40, each dword aligned, inside
    /// the first 256 bytes; the previous capability's Next Pointer (or the Capabilities Pointer)
    /// is linked to the new one and the Status register's Capabilities List bit is set.
    pub fn add_capability_with_masks(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
        w1c: &[u8],
    ) -> Result<u16, PciConfigError> {
        Self::check_capability(body, writable, w1c, 2)?;
        let offset = self.next_capability;
        let end = offset + body.len();
        if end > CONVENTIONAL_CONFIG_SPACE_SIZE {
            return Err(PciConfigError::NoCapabilitySpace { len: body.len() });
        }
        // Below 256, so it fits in a byte and in u16.
        let offset16 = offset as u16;
        self.place_capability(offset16, body, writable, w1c, 2);
        self.set_u8(offset16, id);
        self.set_u8(offset16 + 1, 0);
        match self.last_capability {
            Some(last) => self.set_u8(last as u16 + 1, offset as u8),
            None => self.set_u8(CAPABILITIES_POINTER, offset as u8),
        }
        let status = self.read_u16(STATUS);
        self.set_u16(STATUS, status | STATUS_CAPABILITIES_LIST);
        self.last_capability = Some(offset);
        self.next_capability = dword_align(end);
        Ok(offset16)
    }

    /// Appends a PCI Express extended capability (PCI Express Base Spec 5.0 §7.6.3) and returns
    /// its offset.
    ///
    /// `body` starts with the 4-byte extended capability header, which this method fills in with
    /// `id`, `version` (4 bits) and a Next Capability Offset of zero; `writable` and `w1c` work as
    /// in [`PciConfiguration::add_capability_with_masks`]. Extended capabilities are placed from
    /// offset 0x100, dword aligned, and linked through the previous header's next offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        writable: &[u8],
        w1c: &[u8],
    ) -> Result<u16, PciConfigError> {
        if version > 0xf {
            return Err(PciConfigError::CapabilityVersion(version));
        }
        Self::check_capability(body, writable, w1c, 4)?;
        let offset = self.next_extended_capability;
        let end = offset + body.len();
        if end > CONFIG_SPACE_SIZE {
            return Err(PciConfigError::NoCapabilitySpace { len: body.len() });
        }
        // Below 4096, so it fits in u16 and in the 12-bit next offset field.
        let offset16 = offset as u16;
        self.place_capability(offset16, body, writable, w1c, 4);
        self.set_u32(offset16, u32::from(id) | (u32::from(version) << 16));
        if let Some(last) = self.last_extended_capability {
            let header = self.read_u32(last as u16);
            self.set_u32(
                last as u16,
                (header & 0x000f_ffff) | ((offset as u32) << 20),
            );
        }
        self.last_extended_capability = Some(offset);
        self.next_extended_capability = dword_align(end);
        Ok(offset16)
    }

    fn check_capability(
        body: &[u8],
        writable: &[u8],
        w1c: &[u8],
        header: usize,
    ) -> Result<(), PciConfigError> {
        if body.len() < header {
            return Err(PciConfigError::CapabilityTooShort {
                len: body.len(),
                header,
            });
        }
        if writable.len() > body.len()
            || w1c.len() > body.len()
            || writable.iter().zip(w1c).any(|(w, c)| w & c != 0)
        {
            return Err(PciConfigError::CapabilityMasks);
        }
        Ok(())
    }

    /// Copies a checked capability to `offset` with its masks; the header stays read-only.
    fn place_capability(
        &mut self,
        offset: u16,
        body: &[u8],
        writable: &[u8],
        w1c: &[u8],
        header: usize,
    ) {
        self.set_bytes(offset, body);
        let mut masks = vec![0u8; body.len()];
        masks[..writable.len()].copy_from_slice(writable);
        masks[..header].fill(0);
        self.set_writable_bits(offset, &masks);
        masks.fill(0);
        masks[..w1c.len()].copy_from_slice(w1c);
        masks[..header].fill(0);
        self.set_w1c_bits(offset, &masks);
        // Bytes between this capability and the next dword boundary stay read-only zero.
    }

    /// Offset of the first conventional capability with `id`, following the chain from the
    /// Capabilities Pointer.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        let mut offset = self.read_u8(CAPABILITIES_POINTER) & !0x3;
        // At most 48 capabilities fit between 0x40 and 0x100: bounds a malformed chain.
        for _ in 0..48 {
            if offset < FIRST_CAPABILITY_OFFSET as u8 {
                return None;
            }
            if self.read_u8(u16::from(offset)) == id {
                return Some(u16::from(offset));
            }
            offset = self.read_u8(u16::from(offset) + 1) & !0x3;
        }
        None
    }

    /// Offset of the first extended capability with `id`, following the chain from 0x100.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        let mut offset = FIRST_EXTENDED_CAPABILITY_OFFSET;
        // At most 960 dword headers fit between 0x100 and 0x1000: bounds a malformed chain.
        for _ in 0..960 {
            let header = self.read_u32(offset);
            if header == 0 || header == u32::MAX {
                return None;
            }
            if header & 0xffff == u32::from(id) {
                return Some(offset);
            }
            let next = ((header >> 20) & 0xffc) as u16;
            if next < FIRST_EXTENDED_CAPABILITY_OFFSET {
                return None;
            }
            offset = next;
        }
        None
    }
}

/// The saved state of a [`PciConfiguration`]: every register's value and the raw values the
/// guest last wrote to the BARs. Masks, BAR sizes and capabilities are not saved: they come
/// from building the same function again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// The 4 KiB of registers.
    #[serde(with = "hex")]
    pub data: Vec<u8>,
    /// The raw values last written to each BAR dword.
    pub bar_written: [u32; NUM_BARS_TYPE0],
}

impl PciConfiguration {
    /// The registers as they are now.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            data: self.data.to_vec(),
            bar_written: self.bar_written,
        }
    }

    /// Puts `state` back. Refused, changing nothing, unless it is the state of a function with
    /// the same vendor, device and class and the same header layout (`model` names the function
    /// in the error).
    pub fn restore(
        &mut self,
        model: &str,
        state: &PciConfigurationState,
    ) -> Result<(), StateError> {
        let data: &[u8; CONFIG_SPACE_SIZE] = state.data.as_slice().try_into().map_err(|_| {
            StateError::new(
                model,
                format!(
                    "saved configuration space has {} bytes, not {CONFIG_SPACE_SIZE}",
                    state.data.len()
                ),
            )
        })?;
        let dword = |d: &[u8; CONFIG_SPACE_SIZE], at: u16| {
            let at = usize::from(at);
            u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
        };
        expect_same(
            model,
            "vendor/device ID",
            dword(data, VENDOR_ID),
            dword(&self.data, VENDOR_ID),
        )?;
        expect_same(
            model,
            "class code",
            dword(data, REVISION_ID) >> 8,
            dword(&self.data, REVISION_ID) >> 8,
        )?;
        expect_same(
            model,
            "header type",
            data[usize::from(HEADER_TYPE)],
            self.data[usize::from(HEADER_TYPE)],
        )?;
        self.data.copy_from_slice(data);
        self.bar_written = state.bar_written;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1b36,
            device_id: 0x000c,
            revision_id: 0x02,
            class_code: 0x06,
            subclass: 0x04,
            prog_if: 0x00,
            multifunction: false,
        }
    }

    fn endpoint() -> PciConfiguration {
        PciConfiguration::new_type0(
            &PciIdentity {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                revision_id: 0x01,
                class_code: 0x01,
                subclass: 0x00,
                prog_if: 0x00,
                multifunction: false,
            },
            0x1af4,
            0x1100,
        )
    }

    fn bridge() -> PciConfiguration {
        PciConfiguration::new_type1(&identity())
    }

    /// Writes `value` at `offset` with a 1-, 2- or 4-byte access and returns what the guest reads
    /// back.
    fn write_read(config: &mut PciConfiguration, offset: u16, value: u32, len: usize) -> u32 {
        let _ = config.write(offset, &value.to_le_bytes()[..len]);
        let mut b = [0u8; 4];
        config.read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    /// For each of `len` bytes at `offset`: after writing zeros and then ones, which bits read
    /// back as set (with all bits set beforehand via the device-side setter): returns
    /// (bits that a guest write of 0 clears, bits that a guest write of 1 clears).
    fn probe(config: &PciConfiguration, offset: u16, len: usize) -> (u32, u32) {
        let mut c = config.clone();
        let ones = if len == 4 {
            u32::MAX
        } else {
            (1 << (8 * len)) - 1
        };
        c.set_bytes(offset, &ones.to_le_bytes()[..len]);
        let after_zero = write_read(&mut c, offset, 0, len);
        c.set_bytes(offset, &ones.to_le_bytes()[..len]);
        let after_one = write_read(&mut c, offset, ones, len);
        (ones & !after_zero, ones & !after_one)
    }

    /// Asserts the (writable, w1c) masks of the register at `offset`, as observed by the guest:
    /// writable bits follow what is written, W1C bits clear on 1 and survive 0, the rest survive.
    fn assert_masks(config: &PciConfiguration, offset: u16, len: usize, rw: u32, w1c: u32) {
        let (cleared_by_zero, cleared_by_one) = probe(config, offset, len);
        assert_eq!(cleared_by_zero, rw, "RW bits at {offset:#x}");
        assert_eq!(cleared_by_one, w1c, "W1C bits at {offset:#x}");
        // From all-zero, writing ones sets exactly the writable bits.
        let mut c = config.clone();
        c.set_bytes(offset, &[0u8; 4][..len]);
        let ones = if len == 4 {
            u32::MAX
        } else {
            (1 << (8 * len)) - 1
        };
        assert_eq!(
            write_read(&mut c, offset, ones, len),
            rw,
            "set bits at {offset:#x}"
        );
    }

    #[test]
    fn type0_identity_is_read_only() {
        let mut c = endpoint();
        assert_eq!(c.read_u16(VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(DEVICE_ID), 0x1042);
        assert_eq!(c.read_reg(2), 0x0100_0001);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x00);
        assert_eq!(c.read_u16(SUBSYSTEM_VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(SUBSYSTEM_ID), 0x1100);
        for offset in [VENDOR_ID, 0x08, 0x2c, 0x30, 0x34, 0x0c] {
            let before = c.read_u32(offset);
            let _ = c.write(offset, &[0x5a; 4]);
            let after = c.read_u32(offset);
            let rw = if offset == 0x0c { 0xff } else { 0 };
            assert_eq!(after & !rw, before & !rw, "offset {offset:#x}");
        }
        assert_masks(&c, VENDOR_ID, 4, 0, 0);
        assert_masks(&c, REVISION_ID, 4, 0, 0);
        assert_masks(&c, CACHE_LINE_SIZE, 1, 0xff, 0);
        assert_masks(&c, LATENCY_TIMER, 1, 0, 0);
        assert_masks(&c, HEADER_TYPE, 1, 0, 0);
        assert_masks(&c, BIST, 1, 0, 0);
        assert_masks(&c, CARDBUS_CIS_POINTER, 4, 0, 0);
        assert_masks(&c, SUBSYSTEM_VENDOR_ID, 4, 0, 0);
        assert_masks(&c, EXPANSION_ROM_BASE, 4, 0, 0);
        assert_masks(&c, CAPABILITIES_POINTER, 1, 0, 0);
        assert_masks(&c, INTERRUPT_LINE, 1, 0xff, 0);
        assert_masks(&c, INTERRUPT_PIN, 1, 0, 0);
        assert_masks(&c, MIN_GNT, 2, 0, 0);
        for bar in 0..6 {
            assert_masks(&c, BAR0 + 4 * bar, 4, 0, 0);
        }
    }

    #[test]
    fn multifunction_bit() {
        let mut id = identity();
        id.multifunction = true;
        assert_eq!(PciConfiguration::new_type1(&id).read_u8(HEADER_TYPE), 0x81);
        assert_eq!(
            PciConfiguration::new_type0(&id, 0, 0).read_u8(HEADER_TYPE),
            0x80
        );
        assert_eq!(bridge().read_u8(HEADER_TYPE), 0x01);
    }

    #[test]
    fn command_and_status() {
        for c in [endpoint(), bridge()] {
            assert_masks(&c, COMMAND, 2, 0x0547, 0);
            assert_masks(&c, STATUS, 2, 0, 0xf900);
        }
        let mut c = endpoint();
        // Device sets errors, interrupt status and capability list; guest clears only errors.
        c.set_u16(STATUS, 0xf900 | STATUS_INTERRUPT | STATUS_CAPABILITIES_LIST);
        let _ = c.write(STATUS, &0x0900u16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0xf000 | 0x18);
        // Writing the read-back value back (a read-modify-write of Command) clears all errors.
        let _ = c.write(COMMAND, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0x18);
        assert_eq!(c.read_u16(COMMAND), 0x0547);
        // A byte write to the Status high byte.
        c.set_u16(STATUS, 0xc000);
        let _ = c.write(STATUS + 1, &[0x40]);
        assert_eq!(c.read_u16(STATUS), 0x8000);
    }

    #[test]
    fn type1_registers() {
        let c = bridge();
        assert_masks(&c, PRIMARY_BUS, 1, 0xff, 0);
        assert_masks(&c, SECONDARY_BUS, 1, 0xff, 0);
        assert_masks(&c, SUBORDINATE_BUS, 1, 0xff, 0);
        assert_masks(&c, SECONDARY_LATENCY_TIMER, 1, 0, 0);
        assert_masks(&c, IO_BASE, 2, 0xf0f0, 0);
        assert_masks(&c, SECONDARY_STATUS, 2, 0, 0xf900);
        assert_masks(&c, MEMORY_BASE, 4, 0xfff0_fff0, 0);
        assert_masks(&c, PREFETCHABLE_MEMORY_BASE, 4, 0xfff0_fff0, 0);
        assert_masks(&c, PREFETCHABLE_BASE_UPPER32, 4, u32::MAX, 0);
        assert_masks(&c, PREFETCHABLE_LIMIT_UPPER32, 4, u32::MAX, 0);
        assert_masks(&c, IO_BASE_UPPER16, 4, 0, 0);
        assert_masks(&c, CAPABILITIES_POINTER, 4, 0, 0);
        assert_masks(&c, BRIDGE_EXPANSION_ROM_BASE, 4, 0, 0);
        assert_masks(&c, INTERRUPT_LINE, 1, 0xff, 0);
        assert_masks(&c, INTERRUPT_PIN, 1, 0, 0);
        assert_masks(&c, BRIDGE_CONTROL, 2, 0x005f, 0);
        assert_masks(&c, BAR0, 4, 0, 0);
        assert_masks(&c, BAR0 + 4, 4, 0, 0);
        // Read-only capability bits: 16-bit I/O, 64-bit prefetchable; windows start disabled.
        assert_eq!(c.read_u8(IO_BASE) & 0xf, 0);
        assert_eq!(c.read_u16(PREFETCHABLE_MEMORY_BASE) & 0xf, 1);
        assert_eq!(c.read_u16(PREFETCHABLE_MEMORY_LIMIT) & 0xf, 1);
        assert!(c.read_u8(IO_BASE) > c.read_u8(IO_LIMIT));
        assert!(c.read_u16(MEMORY_BASE) > c.read_u16(MEMORY_LIMIT));
        // Class and header type.
        assert_eq!(c.read_reg(2) >> 8, 0x06_04_00);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x01);
    }

    #[test]
    fn type1_bus_numbers_and_windows() {
        let mut c = bridge();
        let _ = c.write(PRIMARY_BUS, &0x00ff_0100u32.to_le_bytes());
        assert_eq!(c.read_u8(PRIMARY_BUS), 0);
        assert_eq!(c.read_u8(SECONDARY_BUS), 1);
        assert_eq!(c.read_u8(SUBORDINATE_BUS), 0xff);
        assert_eq!(c.read_u8(SECONDARY_LATENCY_TIMER), 0);
        let _ = c.write(MEMORY_BASE, &0xfe1f_fe00u32.to_le_bytes());
        assert_eq!(c.read_u32(MEMORY_BASE), 0xfe10_fe00);
        let _ = c.write(IO_BASE, &[0x1f, 0x2f]);
        assert_eq!(c.read_u16(IO_BASE), 0x2010);
        // Secondary Status: device sets Received Master Abort, guest clears it.
        c.set_u16(SECONDARY_STATUS, STATUS_RECEIVED_MASTER_ABORT);
        let _ = c.write(
            SECONDARY_STATUS,
            &STATUS_RECEIVED_MASTER_ABORT.to_le_bytes(),
        );
        assert_eq!(c.read_u16(SECONDARY_STATUS), 0);
    }

    #[test]
    fn memory32_bar_sizing() {
        let mut c = endpoint();
        c.add_bar(
            0,
            0x1000,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(1, 0x10_0000, BarKind::Memory32 { prefetchable: true })
            .unwrap();
        assert_eq!(write_read(&mut c, BAR0, u32::MAX, 4), 0xffff_f000);
        assert_eq!(write_read(&mut c, BAR0 + 4, u32::MAX, 4), 0xfff0_0008);
        // Restore and program: the size-mask bits and type bits ignore writes.
        assert_eq!(write_read(&mut c, BAR0, 0xfebf_1fff, 4), 0xfebf_1000);
        assert_eq!(c.bar_address(0), Some(0xfebf_1000));
        assert_eq!(write_read(&mut c, BAR0 + 4, 0xfe8f_fff7, 4), 0xfe80_0008);
        assert_eq!(c.bar_address(1), Some(0xfe80_0000));
        // Unused BARs read zero and ignore writes.
        for i in 2..6 {
            assert_eq!(write_read(&mut c, BAR0 + 4 * i, u32::MAX, 4), 0);
            assert_eq!(c.bar_address(i as usize), None);
        }
    }

    #[test]
    fn memory64_bar_sizing_both_halves() {
        let mut c = endpoint();
        c.add_bar(2, 0x4000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        assert_eq!(c.read_u32(BAR0 + 8), 0x0c);
        assert_eq!(write_read(&mut c, BAR0 + 8, u32::MAX, 4), 0xffff_c00c);
        assert_eq!(write_read(&mut c, BAR0 + 12, u32::MAX, 4), u32::MAX);
        let _ = c.write(BAR0 + 8, &0x8000_000cu32.to_le_bytes());
        let _ = c.write(BAR0 + 12, &0x0000_0004u32.to_le_bytes());
        assert_eq!(c.bar_address(2), Some(0x4_8000_0000));
        assert_eq!(c.bar_address(3), None, "upper half is not a BAR");
        // A BAR larger than 4 GiB: the low dword has no address bits, the upper some.
        let mut c = endpoint();
        c.add_bar(
            0,
            1 << 34,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )
        .unwrap();
        assert_eq!(write_read(&mut c, BAR0, u32::MAX, 4), 0x4);
        assert_eq!(write_read(&mut c, BAR0 + 4, u32::MAX, 4), 0xffff_fffc);
        // Size as software computes it from the two halves.
        let raw = (u64::from(c.read_u32(BAR0 + 4)) << 32) | u64::from(c.read_u32(BAR0) & !0xf);
        assert_eq!(!raw + 1, 1 << 34);
    }

    #[test]
    fn io_bar_sizing() {
        let mut c = endpoint();
        c.add_bar(4, 0x20, BarKind::Io).unwrap();
        assert_eq!(c.read_u32(BAR0 + 16), 0x1);
        assert_eq!(write_read(&mut c, BAR0 + 16, u32::MAX, 4), 0x0000_ffe1);
        assert_eq!(write_read(&mut c, BAR0 + 16, 0xc03f, 4), 0xc021);
        assert_eq!(c.bar_address(4), Some(0xc020));
        // Word access to the low half.
        assert_eq!(write_read(&mut c, BAR0 + 16, 0xd000, 2), 0xd001);
        assert_eq!(c.bar_address(4), Some(0xd000));
    }

    #[test]
    fn bar_errors() {
        let mut c = endpoint();
        let mem = BarKind::Memory32 {
            prefetchable: false,
        };
        let mem64 = BarKind::Memory64 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(6, 0x1000, mem), Err(PciConfigError::BarIndex(6)));
        assert_eq!(
            c.add_bar(5, 0x1000, mem64),
            Err(PciConfigError::BarIndex(5))
        );
        assert!(matches!(
            c.add_bar(0, 0x1800, mem),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 8, mem),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 512, BarKind::Io),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 1 << 32, mem),
            Err(PciConfigError::BarSize { .. })
        ));
        c.add_bar(0, 0x1000, mem64).unwrap();
        assert_eq!(c.add_bar(1, 0x1000, mem), Err(PciConfigError::BarInUse(1)));
        assert_eq!(c.add_bar(0, 0x1000, mem), Err(PciConfigError::BarInUse(0)));
        assert_eq!(
            c.set_bar_address(0, 0x1800),
            Err(PciConfigError::BarAddress {
                index: 0,
                address: 0x1800
            })
        );
        assert_eq!(c.set_bar_address(1, 0x1000), Err(PciConfigError::NoBar(1)));
        let mut b = bridge();
        assert_eq!(b.add_bar(2, 0x1000, mem), Err(PciConfigError::BarIndex(2)));
        b.add_bar(0, 0x1000, mem64).unwrap();
        assert_masks(&b, BAR0, 4, 0xffff_f000, 0);
        assert_masks(&b, BAR0 + 4, 4, u32::MAX, 0);
    }

    fn enable(c: &mut PciConfiguration, bits: u16) -> Vec<BarReprogram> {
        c.write(COMMAND, &bits.to_le_bytes())
    }

    #[test]
    fn bar_reprogram_on_decode_enable_move_and_disable() {
        let mut c = endpoint();
        let mem = BarKind::Memory32 {
            prefetchable: false,
        };
        c.add_bar(0, 0x1000, mem).unwrap();
        c.add_bar(1, 0x100, BarKind::Io).unwrap();
        // Programming with decoding off produces nothing.
        assert!(c.write(BAR0, &0xe000_0000u32.to_le_bytes()).is_empty());
        assert!(c.write(BAR0 + 4, &0x0000_c001u32.to_le_bytes()).is_empty());
        assert_eq!(c.decoded_bar_address(0), None);
        // Memory enable maps the memory BAR only.
        assert_eq!(
            enable(&mut c, COMMAND_MEMORY_SPACE),
            vec![BarReprogram {
                index: 0,
                kind: mem,
                size: 0x1000,
                old: None,
                new: Some(0xe000_0000)
            }]
        );
        // I/O enable on top maps the I/O BAR only.
        assert_eq!(
            enable(&mut c, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE),
            vec![BarReprogram {
                index: 1,
                kind: BarKind::Io,
                size: 0x100,
                old: None,
                new: Some(0xc000)
            }]
        );
        // Writing the same Command again changes nothing.
        assert!(enable(&mut c, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE).is_empty());
        // Bus master does not affect decoding.
        assert!(enable(
            &mut c,
            COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE | COMMAND_BUS_MASTER
        )
        .is_empty());
        // Moving a decoded BAR.
        assert_eq!(
            c.write(BAR0, &0xe010_0000u32.to_le_bytes()),
            vec![BarReprogram {
                index: 0,
                kind: mem,
                size: 0x1000,
                old: Some(0xe000_0000),
                new: Some(0xe010_0000)
            }]
        );
        // Rewriting the same address changes nothing.
        assert!(c.write(BAR0, &0xe010_0000u32.to_le_bytes()).is_empty());
        assert_eq!(
            c.decoded_bars(),
            vec![
                BarRegion {
                    index: 0,
                    kind: mem,
                    size: 0x1000,
                    address: 0xe010_0000
                },
                BarRegion {
                    index: 1,
                    kind: BarKind::Io,
                    size: 0x100,
                    address: 0xc000
                }
            ]
        );
        // Disabling both unmaps both.
        let changes = enable(&mut c, 0);
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|r| r.old.is_some() && r.new.is_none()));
        // Writes elsewhere never report.
        assert!(c.write(INTERRUPT_LINE, &[5]).is_empty());
    }

    #[test]
    fn sizing_with_decoding_enabled_unmaps_then_remaps() {
        let mut c = endpoint();
        let kind = BarKind::Memory64 {
            prefetchable: false,
        };
        c.add_bar(0, 0x4000, kind).unwrap();
        c.set_bar_address(0, 0x1_0000_0000).unwrap();
        assert!(enable(&mut c, COMMAND_MEMORY_SPACE).len() == 1);
        let probe = c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(probe.len(), 1);
        assert_eq!((probe[0].old, probe[0].new), (Some(0x1_0000_0000), None));
        let restore = c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(
            (restore[0].old, restore[0].new),
            (None, Some(0x1_0000_0000))
        );
        // Sizing the low half byte by byte also counts as sizing.
        let mut all = Vec::new();
        for i in 0..4 {
            all.extend(c.write(BAR0 + i, &[0xff]));
        }
        assert_eq!(all.last().unwrap().new, None);
        assert_eq!(c.decoded_bar_address(0), None);
        // A real address whose address bits are all ones is not a probe: type bits differ.
        let mut c = endpoint();
        c.add_bar(
            0,
            0x1000,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        let _ = enable(&mut c, COMMAND_MEMORY_SPACE);
        let r = c.write(BAR0, &0xffff_f000u32.to_le_bytes());
        assert_eq!(r[0].new, Some(0xffff_f000));
    }

    #[test]
    fn bar_at_zero_or_out_of_space_is_not_decoded() {
        let mut c = endpoint();
        c.add_bar(0, 0x100, BarKind::Io).unwrap();
        c.add_bar(
            1,
            0x1000,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        assert!(enable(&mut c, COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE).is_empty());
        // I/O BAR upper 16 bits are hardwired to zero.
        assert_eq!(write_read(&mut c, BAR0, 0x1234_5601, 4), 0x5601);
        assert_eq!(c.decoded_bar_address(0), Some(0x5600));
        assert!(c.set_bar_address(0, 0x1_0000).is_err());
    }

    #[test]
    fn set_bar_address_is_silent_and_decoded() {
        let mut c = endpoint();
        c.add_bar(0, 0x1000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        c.set_bar_address(0, 0x2_0000_3000).unwrap();
        c.set_u16(COMMAND, COMMAND_MEMORY_SPACE);
        assert_eq!(c.decoded_bar_address(0), Some(0x2_0000_3000));
        assert_eq!(c.read_u32(BAR0), 0x3000 | 0xc);
        assert_eq!(c.read_u32(BAR0 + 4), 0x2);
        assert_eq!(
            c.bar(0),
            Some(BarRegion {
                index: 0,
                kind: BarKind::Memory64 { prefetchable: true },
                size: 0x1000,
                address: 0x2_0000_3000
            })
        );
        assert_eq!(c.bars().len(), 1);
    }

    #[test]
    fn capability_chain() {
        let mut c = endpoint();
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0);
        // PM capability: 8 bytes, PMCSR (offset 4) power state bits 1:0 writable, PME status
        // (bit 15) write-1-to-clear.
        let pm = [0xaa, 0xbb, 0x03, 0x00, 0x00, 0x80, 0x00, 0x00];
        let off = c
            .add_capability_with_masks(
                CAP_ID_POWER_MANAGEMENT,
                &pm,
                &[0, 0, 0, 0, 0x03],
                &[0, 0, 0, 0, 0, 0x80],
            )
            .unwrap();
        assert_eq!(off, 0x40);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u16(0x40), 0x0001, "id filled in, next zero");
        assert_masks(&c, 0x44, 2, 0x0003, 0x8000);
        assert_masks(&c, 0x40, 4, 0, 0);
        // A 10-byte capability is followed by one at the next dword boundary.
        let off2 = c.add_capability(CAP_ID_VENDOR_SPECIFIC, &[0; 10]).unwrap();
        assert_eq!(off2, 0x48);
        let off3 = c.add_capability(CAP_ID_MSI, &[0; 4]).unwrap();
        assert_eq!(off3, 0x54);
        assert_eq!(c.read_u8(0x41), 0x48);
        assert_eq!(c.read_u8(0x49), 0x54);
        assert_eq!(c.read_u8(0x55), 0x00);
        assert_eq!(c.find_capability(CAP_ID_MSI), Some(0x54));
        assert_eq!(c.find_capability(CAP_ID_VENDOR_SPECIFIC), Some(0x48));
        assert_eq!(c.find_capability(CAP_ID_MSIX), None);
        // The guest cannot break the chain.
        let _ = c.write(0x40, &[0; 8]);
        let _ = c.write(CAPABILITIES_POINTER, &[0]);
        assert_eq!(c.read_u16(0x40), 0x4801);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        let _ = c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
    }

    #[test]
    fn capability_errors() {
        let mut c = endpoint();
        assert!(matches!(
            c.add_capability(CAP_ID_MSI, &[0]),
            Err(PciConfigError::CapabilityTooShort { .. })
        ));
        assert_eq!(
            c.add_capability_with_masks(CAP_ID_MSI, &[0; 4], &[0; 5], &[]),
            Err(PciConfigError::CapabilityMasks)
        );
        assert_eq!(
            c.add_capability_with_masks(CAP_ID_MSI, &[0; 4], &[0, 0, 1], &[0, 0, 1]),
            Err(PciConfigError::CapabilityMasks)
        );
        assert_eq!(
            c.add_capability(CAP_ID_MSI, &[0; 0xc4]),
            Err(PciConfigError::NoCapabilitySpace { len: 0xc4 })
        );
        // Exactly filling the conventional space works, and then there is no room.
        assert_eq!(c.add_capability(CAP_ID_MSI, &[0; 0xc0]), Ok(0x40));
        assert!(c.add_capability(CAP_ID_MSI, &[0; 2]).is_err());
        assert_eq!(
            c.add_extended_capability(1, 16, &[0; 4], &[], &[]),
            Err(PciConfigError::CapabilityVersion(16))
        );
        assert!(c.add_extended_capability(1, 1, &[0; 3], &[], &[]).is_err());
    }

    #[test]
    fn extended_capabilities() {
        let mut c = endpoint();
        assert_eq!(
            c.read_u32(0x100),
            0,
            "no extended capabilities: header reads zero"
        );
        assert_eq!(c.find_extended_capability(1), None);
        // AER-like: 12 bytes; dword at +4 W1C, dword at +8 RW.
        let mut w = [0u8; 12];
        w[8..12].copy_from_slice(&[0xff; 4]);
        let mut w1c = [0u8; 12];
        w1c[4..8].copy_from_slice(&[0xff; 4]);
        let off = c
            .add_extended_capability(0x0001, 2, &[0x77; 12], &w, &w1c)
            .unwrap();
        assert_eq!(off, 0x100);
        assert_eq!(c.read_u32(0x100), 0x0002_0001);
        assert_masks(&c, 0x104, 4, 0, u32::MAX);
        assert_masks(&c, 0x108, 4, u32::MAX, 0);
        assert_masks(&c, 0x100, 4, 0, 0);
        let off2 = c
            .add_extended_capability(0x000b, 1, &[0; 6], &[], &[])
            .unwrap();
        assert_eq!(off2, 0x10c);
        assert_eq!(c.read_u32(0x100), (0x10c << 20) | 0x0002_0001);
        assert_eq!(c.read_u32(0x10c), 0x0001_000b);
        let off3 = c
            .add_extended_capability(0x0010, 1, &[0; 8], &[], &[])
            .unwrap();
        assert_eq!(off3, 0x114);
        assert_eq!(c.read_u32(0x10c) >> 20, 0x114);
        assert_eq!(c.find_extended_capability(0x0010), Some(0x114));
        assert_eq!(c.find_extended_capability(0x000b), Some(0x10c));
        assert_eq!(c.find_extended_capability(0x0002), None);
        // Up to the very end of the space.
        let rest = CONFIG_SPACE_SIZE - 0x11c;
        assert_eq!(
            c.add_extended_capability(0x0023, 1, &vec![0; rest], &[], &[]),
            Ok(0x11c)
        );
        assert!(c
            .add_extended_capability(0x0023, 1, &[0; 4], &[], &[])
            .is_err());
    }

    #[test]
    fn device_side_setters_bypass_masks() {
        let mut c = endpoint();
        c.set_u16(VENDOR_ID, 0x1234);
        c.set_u8(INTERRUPT_PIN, 1);
        c.set_u32(0xffc, 0xdead_beef);
        assert_eq!(c.read_u16(VENDOR_ID), 0x1234);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        assert_eq!(c.read_u32(0xffc), 0xdead_beef);
        assert_eq!(c.read_reg(0x3ff), 0xdead_beef);
        // Past the end: truncated or dropped, never a panic.
        c.set_u32(0xffe, 0x1122_3344);
        assert_eq!(c.read_u16(0xffe), 0x3344);
        c.set_u32(u16::MAX, 0);
        c.set_writable_bits(u16::MAX, &[0xff; 8]);
        c.set_w1c_bits(0xfff, &[0xff; 8]);
        assert_eq!(c.w1c_bits(0xfff), 0xff);
        assert_eq!(c.writable_bits(0x1000), 0);
        assert_eq!(c.read_reg(0x400), u32::MAX);
        assert_eq!(c.read_reg(usize::MAX), u32::MAX);
        assert_eq!(c.read_u32(0xffd), u32::MAX);
    }

    #[test]
    fn any_access_anywhere_never_panics() {
        let mut configs = vec![endpoint(), bridge()];
        let mut full = endpoint();
        full.add_bar(0, 0x1000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        full.add_bar(
            2,
            0x10,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        full.add_bar(3, 0x4, BarKind::Io).unwrap();
        full.add_capability_with_masks(CAP_ID_MSI, &[0; 12], &[0xff; 12], &[])
            .unwrap();
        full.add_extended_capability(1, 1, &[0; 8], &[0xff; 8], &[])
            .unwrap();
        full.set_u16(COMMAND, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE);
        configs.push(full);
        for mut c in configs {
            for len in 0..=8usize {
                for offset in 0..(CONFIG_SPACE_SIZE + 16) as u16 {
                    let mut buf = [0u8; 8];
                    c.read(offset, &mut buf[..len]);
                    let end = usize::from(offset) + len;
                    if end > CONFIG_SPACE_SIZE {
                        assert!(buf[..len].iter().all(|&b| b == 0xff), "{offset:#x}/{len}");
                    }
                    let _ = c.write(offset, &[0xff; 8][..len]);
                    let _ = c.write(offset, &[0x00; 8][..len]);
                }
            }
            let mut buf = [0u8; 4];
            c.read(u16::MAX, &mut buf);
            assert_eq!(buf, [0xff; 4]);
            assert!(c.write(u16::MAX, &[0; 4]).is_empty());
            let mut big = vec![0u8; 5000];
            c.read(0, &mut big);
            assert!(big.iter().all(|&b| b == 0xff));
            // Whole-space access works.
            let mut whole = vec![0u8; CONFIG_SPACE_SIZE];
            c.read(0, &mut whole);
            assert_eq!(whole[0..2], c.read_u16(VENDOR_ID).to_le_bytes());
        }
    }

    #[test]
    fn out_of_range_write_is_ignored_entirely() {
        let mut c = endpoint();
        c.set_writable_bits(0xffe, &[0xff, 0xff]);
        let _ = c.write(0xffe, &[1, 2, 3, 4]);
        assert_eq!(c.read_u16(0xffe), 0);
        let _ = c.write(0xffe, &[1, 2]);
        assert_eq!(c.read_u16(0xffe), 0x0201);
    }

    #[test]
    fn state_round_trips_and_refuses_another_function() {
        let mut c = PciConfiguration::new_type0(&identity(), 0x1af4, 0x1100);
        c.add_bar(
            0,
            0x4000,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )
        .unwrap();
        let _ = c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        let _ = c.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let _ = c.write(INTERRUPT_LINE, &[0x0b]);
        let state = c.state();

        let mut r = PciConfiguration::new_type0(&identity(), 0x1af4, 0x1100);
        r.add_bar(
            0,
            0x4000,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )
        .unwrap();
        r.restore("test", &state).unwrap();
        assert_eq!(r.state(), state);
        // The BAR reads as a sizing probe left it, and the next write is an address again.
        assert_eq!(r.read_u32(BAR0), c.read_u32(BAR0));
        let changes = r.write(BAR0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(changes.len(), 1);

        let mut other = PciConfiguration::new_type1(&identity());
        let before = other.state();
        assert!(other.restore("test", &state).is_err());
        assert_eq!(other.state(), before);
        let short = PciConfigurationState {
            data: vec![0; 16],
            bar_written: [0; NUM_BARS_TYPE0],
        };
        assert!(r.restore("test", &short).is_err());
    }
}
