//! Taking a virtio-blk request apart (Virtio 1.2 §5.2.6).
//!
//! The device makes no assumption about how the driver split the request into descriptors
//! (§2.7.4 "Message Framing"): the chain is a run of device-readable bytes followed by a run of
//! device-writable bytes. The first 16 readable bytes are the header (`type`, `reserved`,
//! `sector`); the last writable byte is the status; everything in between is data. Zero-length
//! descriptors carry nothing and are skipped.
//!
//! A chain whose status byte cannot be located or written — it ends in a readable descriptor,
//! puts a readable descriptor after a writable one (§2.7.4.2), is cut short (a descriptor loop,
//! a `next` index out of the table, an unreadable indirect table: `virtio-queue` stops the walk
//! after at most queue-size descriptors), or whose status byte lies outside guest memory — gets
//! no status: the device returns it with used length 0. Any other defect is reported to the
//! driver as `VIRTIO_BLK_S_IOERR` by the executor.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::GuestRam;

/// Size of the request header that precedes the data: `le32 type; le32 reserved; le64 sector`
/// (§5.2.6).
pub const REQUEST_HEADER_SIZE: usize = 16;

/// The request types of §5.2.6 this device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read sectors into the writable data.
    In,
    /// `VIRTIO_BLK_T_OUT`: write the readable data to sectors.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device serial, `VIRTIO_BLK_ID_BYTES` bytes.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: ranges the driver no longer needs.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: ranges that must read back as zeros.
    WriteZeroes,
    /// Anything else (completed with `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// The decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// What the driver asks for.
    pub request_type: RequestType,
    /// First 512-byte sector (IN and OUT; ignored otherwise).
    pub sector: u64,
}

/// A run of guest memory the device reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// Why a chain cannot be served as a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainFault {
    /// The walk ended on a descriptor with `NEXT` set: loop, bad index, unreadable table or a
    /// chain longer than 2^32 bytes. No status byte can be trusted.
    Truncated,
    /// A device-readable descriptor follows a device-writable one. No status byte.
    Misordered,
    /// The last descriptor is not device-writable. No status byte.
    NoStatus,
    /// The status byte is outside guest memory.
    StatusOutsideMemory,
    /// A header or data buffer lies (partly) outside guest memory.
    BufferOutsideMemory,
    /// More data segments than the device advertises in `seg_max`.
    TooManySegments,
}

impl ChainFault {
    /// Whether the device can still answer with a status byte.
    pub fn has_status(self) -> bool {
        matches!(
            self,
            ChainFault::BufferOutsideMemory | ChainFault::TooManySegments
        )
    }
}

/// One request laid out: header bytes, data segments, status byte. Owned by the request
/// processor and reused for every chain, so that parsing allocates nothing once warmed up.
#[derive(Debug)]
pub struct ChainLayout {
    max_segments: usize,
    header: [u8; REQUEST_HEADER_SIZE],
    header_len: usize,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    status: Option<GuestAddress>,
    fault: Option<ChainFault>,
}

impl ChainLayout {
    /// A layout that accepts at most `max_segments` data segments (the `seg_max` the device
    /// advertises).
    pub fn new(max_segments: usize) -> Self {
        ChainLayout {
            max_segments,
            header: [0; REQUEST_HEADER_SIZE],
            header_len: 0,
            readable: Vec::with_capacity(max_segments),
            writable: Vec::with_capacity(max_segments),
            readable_len: 0,
            writable_len: 0,
            status: None,
            fault: None,
        }
    }

    fn clear(&mut self) {
        self.header_len = 0;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.status = None;
        self.fault = None;
    }

    /// Walks `chain` (bounded by `virtio-queue`: at most the queue size, or the indirect table
    /// size, descriptors) and records where everything is. Reads the header bytes from guest
    /// memory; touches nothing else.
    pub fn parse(&mut self, chain: DescriptorChain<&GuestRam>) {
        self.clear();
        let mem: &GuestRam = chain.memory();
        let mut ended_cleanly = true;
        let mut seen_writable = false;
        // The last writable descriptor seen: holds the status byte if the chain ends there.
        let mut pending: Option<Segment> = None;
        for desc in chain.clone() {
            ended_cleanly = !desc.has_next();
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                seen_writable = true;
                if let Some(prev) = pending.replace(seg) {
                    self.push_writable(mem, prev);
                }
            } else if seen_writable {
                self.fault(ChainFault::Misordered);
            } else {
                self.push_readable(mem, seg);
            }
        }
        if !ended_cleanly {
            self.fault(ChainFault::Truncated);
        }
        match pending {
            _ if matches!(
                self.fault,
                Some(ChainFault::Truncated) | Some(ChainFault::Misordered)
            ) => {}
            None => self.fault(ChainFault::NoStatus),
            Some(last) => {
                // Cannot overflow: `len >= 1` and the whole segment was range-checked below,
                // or it is rejected by `check_range` here.
                let status = last.addr.0.checked_add(u64::from(last.len) - 1);
                match status.map(GuestAddress) {
                    Some(addr) if GuestMemoryBackend::check_range(mem, addr, 1) => {
                        self.status = Some(addr);
                        if last.len > 1 {
                            self.push_writable(
                                mem,
                                Segment {
                                    addr: last.addr,
                                    len: last.len - 1,
                                },
                            );
                        }
                    }
                    _ => self.fault(ChainFault::StatusOutsideMemory),
                }
            }
        }
        if self.fault.is_some_and(|f| !f.has_status()) {
            self.status = None;
        }
    }

    /// Records the first fault only: later ones are consequences or equally fatal, except that
    /// a fault which loses the status byte overrides one that keeps it.
    fn fault(&mut self, fault: ChainFault) {
        match self.fault {
            Some(old) if !old.has_status() || fault.has_status() => {}
            _ => self.fault = Some(fault),
        }
    }

    fn check_buffer(&mut self, mem: &GuestRam, seg: Segment) -> bool {
        let ok = GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize);
        if !ok {
            self.fault(ChainFault::BufferOutsideMemory);
        }
        ok
    }

    fn push_readable(&mut self, mem: &GuestRam, mut seg: Segment) {
        if !self.check_buffer(mem, seg) {
            return;
        }
        if self.header_len < REQUEST_HEADER_SIZE {
            let take = (REQUEST_HEADER_SIZE - self.header_len).min(seg.len as usize);
            let dst = &mut self.header[self.header_len..self.header_len + take];
            if mem.read_slice(dst, seg.addr).is_err() {
                self.fault(ChainFault::BufferOutsideMemory);
                return;
            }
            self.header_len += take;
            // `take <= seg.len` and the segment is inside guest memory, so neither overflows.
            seg.addr = GuestAddress(seg.addr.0 + take as u64);
            seg.len -= take as u32;
            if seg.len == 0 {
                return;
            }
        }
        self.readable_len += u64::from(seg.len);
        self.push_data(seg, false);
    }

    fn push_writable(&mut self, mem: &GuestRam, seg: Segment) {
        if !self.check_buffer(mem, seg) {
            return;
        }
        self.writable_len += u64::from(seg.len);
        self.push_data(seg, true);
    }

    fn push_data(&mut self, seg: Segment, writable: bool) {
        if self.readable.len() + self.writable.len() >= self.max_segments {
            self.fault(ChainFault::TooManySegments);
            return;
        }
        if writable {
            self.writable.push(seg);
        } else {
            self.readable.push(seg);
        }
    }

    /// The header, if the chain carries all 16 of its bytes.
    pub fn header(&self) -> Option<RequestHeader> {
        if self.header_len < REQUEST_HEADER_SIZE {
            return None;
        }
        let mut ty = [0u8; 4];
        ty.copy_from_slice(&self.header[0..4]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&self.header[8..16]);
        Some(RequestHeader {
            request_type: RequestType::from(u32::from_le_bytes(ty)),
            sector: u64::from_le_bytes(sector),
        })
    }

    /// Where the status byte goes, if the chain has a usable one.
    pub fn status(&self) -> Option<GuestAddress> {
        self.status
    }

    /// What is wrong with the chain, if anything.
    pub fn chain_fault(&self) -> Option<ChainFault> {
        self.fault
    }

    /// Device-readable data after the header.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// Device-writable data before the status byte.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total bytes of [`ChainLayout::readable`].
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total bytes of [`ChainLayout::writable`].
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }
}

/// Reads `buf.len()` bytes at logical offset `offset` of the data described by `segments`.
/// Returns false if the data is shorter or guest memory fails.
pub fn read_data(mem: &GuestRam, segments: &[Segment], mut offset: u64, buf: &mut [u8]) -> bool {
    let mut filled = 0;
    for seg in segments {
        if filled == buf.len() {
            break;
        }
        let len = u64::from(seg.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let take = ((len - offset) as usize).min(buf.len() - filled);
        let addr = GuestAddress(seg.addr.0 + offset);
        if mem
            .read_slice(&mut buf[filled..filled + take], addr)
            .is_err()
        {
            return false;
        }
        filled += take;
        offset = 0;
    }
    filled == buf.len()
}

/// Writes `data` to the start of the memory described by `segments`, as far as it reaches.
/// Returns the number of bytes written, or `None` if guest memory fails.
pub fn write_data(mem: &GuestRam, segments: &[Segment], data: &[u8]) -> Option<usize> {
    let mut done = 0;
    for seg in segments {
        if done == data.len() {
            break;
        }
        let take = (seg.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + take], seg.addr).ok()?;
        done += take;
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::*;

    fn layout_of(mem: &GuestRam, descs: &[virtio_queue::desc::RawDescriptor]) -> ChainLayout {
        let mut layout = ChainLayout::new(4);
        with_chain(mem, descs, |c| layout.parse(c));
        layout
    }

    #[test]
    fn splits_header_data_and_status() {
        let mem = guest_memory();
        put_header(&mem, BUF, VIRTIO_BLK_T_OUT, 0x1234);
        let l = layout_of(&mem, &[desc(BUF, 20, 0), desc(BUF + 0x100, 8, W)]);
        assert_eq!(l.chain_fault(), None);
        assert_eq!(
            l.header(),
            Some(RequestHeader {
                request_type: RequestType::Out,
                sector: 0x1234
            })
        );
        assert_eq!(
            l.readable(),
            &[Segment {
                addr: GuestAddress(BUF + 16),
                len: 4
            }]
        );
        assert_eq!(
            l.writable(),
            &[Segment {
                addr: GuestAddress(BUF + 0x100),
                len: 7
            }]
        );
        assert_eq!(l.status(), Some(GuestAddress(BUF + 0x107)));
        assert_eq!((l.readable_len(), l.writable_len()), (4, 7));
    }

    #[test]
    fn classifies_faults() {
        let mem = guest_memory();
        let cases = [
            (vec![desc(BUF, 16, 0)], ChainFault::NoStatus),
            (
                vec![desc(BUF, 16, W), desc(BUF, 16, 0)],
                ChainFault::Misordered,
            ),
            (
                vec![desc(BUF, 16, 0), desc(RAM_SIZE, 1, W)],
                ChainFault::StatusOutsideMemory,
            ),
            (
                vec![desc(BUF, 16, 0), desc(RAM_SIZE, 8, 0), desc(BUF, 1, W)],
                ChainFault::BufferOutsideMemory,
            ),
            (
                (0..6)
                    .map(|i| desc(BUF + 0x200 * i, 0x200, 0))
                    .chain([desc(BUF, 1, W)])
                    .collect(),
                ChainFault::TooManySegments,
            ),
        ];
        for (descs, fault) in cases {
            let l = layout_of(&mem, &descs);
            assert_eq!(l.chain_fault(), Some(fault));
            assert_eq!(l.status().is_some(), fault.has_status(), "{fault:?}");
        }
        let mut layout = ChainLayout::new(4);
        with_raw_chain(&mem, &[desc_next(BUF, 16, N, 0)], 0, |c| layout.parse(c));
        assert_eq!(layout.chain_fault(), Some(ChainFault::Truncated));
        // The layout is reusable: a good chain afterwards parses cleanly.
        with_chain(&mem, &[desc(BUF, 16, 0), desc(BUF + 16, 1, W)], |c| {
            layout.parse(c)
        });
        assert_eq!(layout.chain_fault(), None);
    }

    #[test]
    fn data_helpers_cross_segments() {
        let mem = guest_memory();
        let segs = [
            Segment {
                addr: GuestAddress(BUF),
                len: 3,
            },
            Segment {
                addr: GuestAddress(BUF + 0x100),
                len: 5,
            },
        ];
        assert_eq!(write_data(&mem, &segs, b"abcdefghij"), Some(8));
        let mut buf = [0u8; 4];
        assert!(read_data(&mem, &segs, 2, &mut buf));
        assert_eq!(&buf, b"cdef");
        assert!(!read_data(&mem, &segs, 5, &mut buf));
        let outside = [Segment {
            addr: GuestAddress(RAM_SIZE),
            len: 4,
        }];
        assert!(!read_data(&mem, &outside, 0, &mut buf));
        assert_eq!(write_data(&mem, &outside, b"x"), None);
    }
}
