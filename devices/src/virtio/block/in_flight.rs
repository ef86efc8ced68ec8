//! The requests of one queue whose host I/O is under way.
//!
//! Each request the device takes from the available ring gets a [`Slot`] until its completion
//! is in the used ring: the descriptor chain's head, where its status byte goes, and its host
//! operation (the `iovec`s into guest memory). Slots are made once per queue — as many as the
//! queue has descriptors, the most chains a driver can have outstanding — and reused, their
//! vectors keeping whatever capacity the largest request needed: once warmed up, serving a
//! request allocates nothing.
//!
//! [`InFlight`] also orders flushes. Requests of a queue run concurrently and complete in any
//! order (Virtio 1.2 §2.7.8: the device may use buffers in any order), but a flush must cover
//! the writes the driver submitted before it: Linux's block layer sends a `REQ_PREFLUSH` write
//! as a flush followed by the write, and expects the flush to make durable every write it had
//! completed; a device that started `fdatasync` while earlier writes were still in flight could
//! let one of them miss it. So a flush waits — held in its slot, not submitted — until every
//! request taken before it has completed, and no request after it is taken meanwhile
//! ([`InFlight::blocked`]). The hold is brief: flushes are rare next to reads and writes.

use std::os::unix::io::RawFd;

use vm_memory::GuestAddress;

use super::host_io::{consume, DiscardRange, HostOp, IoVec};
use super::request::Segment;

/// What a slot's host operation does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoKind {
    /// Read from the image into guest memory.
    #[default]
    Read,
    /// Write guest memory to the image.
    Write,
    /// `fdatasync` the image.
    Flush,
    /// Discard ranges through the image's format layer.
    Discard,
    /// Write zeroes to ranges through the image's format layer.
    WriteZeroes,
}

impl IoKind {
    /// Name in logs and backend-error reports.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Discard => "discard",
            IoKind::WriteZeroes => "write zeroes",
        }
    }

    /// Whether the operation moves data (and so may be short).
    fn moves_data(self) -> bool {
        matches!(self, IoKind::Read | IoKind::Write)
    }
}

/// One request in flight.
#[derive(Debug, Default)]
pub struct Slot {
    /// Head of its descriptor chain: what the used ring entry names.
    pub head: u16,
    /// Where its status byte goes.
    pub status: GuestAddress,
    /// Its host operation.
    pub kind: IoKind,
    /// The image's file descriptor.
    pub fd: RawFd,
    /// Byte offset in the image.
    pub offset: u64,
    /// Data bytes of the request (reads report them in the used length).
    pub len: u32,
    /// Bytes transferred so far (more than 0 only after a short transfer).
    pub done: usize,
    /// First `iovec` not yet used up (after a short transfer).
    pub next_iov: usize,
    /// The guest memory the request reads into or writes from (a read marks it dirty when
    /// the data has landed).
    pub segments: Vec<Segment>,
    /// The same memory as host addresses.
    pub iovecs: Vec<IoVec>,
    /// The ranges of a discard or write zeroes run by the format layer.
    pub ranges: Vec<DiscardRange>,
    /// Taken by a request (not on the free list).
    taken: bool,
}

impl Slot {
    /// Makes the slot ready for a new request (keeping its vectors' capacity).
    pub fn clear(&mut self) {
        self.done = 0;
        self.next_iov = 0;
        self.segments.clear();
        self.iovecs.clear();
        self.ranges.clear();
    }

    /// The host operation for what is left of the request.
    pub fn op(&mut self) -> HostOp {
        let start = self.next_iov.min(self.iovecs.len());
        let rest = &mut self.iovecs[start..];
        let (iov, iovcnt) = (rest.as_mut_ptr(), rest.len() as u32);
        let offset = self.offset + self.done as u64;
        match self.kind {
            IoKind::Read => HostOp::Read {
                fd: self.fd,
                offset,
                iov,
                iovcnt,
            },
            IoKind::Write => HostOp::Write {
                fd: self.fd,
                offset,
                iov,
                iovcnt,
            },
            IoKind::Flush => HostOp::Flush { fd: self.fd },
            IoKind::Discard | IoKind::WriteZeroes => HostOp::Discard {
                ranges: self.ranges.as_ptr(),
                count: self.ranges.len() as u32,
                zeroes: self.kind == IoKind::WriteZeroes,
            },
        }
    }

    /// Records `n` bytes transferred; whether the request is whole (a flush, discard or write
    /// zeroes always is). A transfer of 0 bytes short of the end is end of file: treat as
    /// whole, and let the caller fail it ([`short_by`](Self::short_by)).
    pub fn transferred(&mut self, n: usize) -> bool {
        if !self.kind.moves_data() {
            return true;
        }
        self.done += n;
        if n == 0 || self.done >= self.len as usize {
            return true;
        }
        let start = self.next_iov.min(self.iovecs.len());
        self.next_iov = start + consume(&mut self.iovecs[start..], n);
        false
    }

    /// How many bytes the transfer fell short of the request.
    pub fn short_by(&self) -> usize {
        if self.kind.moves_data() {
            (self.len as usize).saturating_sub(self.done)
        } else {
            0
        }
    }
}

/// The slots of one queue and the requests in flight in them.
#[derive(Debug)]
pub struct InFlight {
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Requests handed to the engine and not yet completed.
    submitted: usize,
    /// A flush waiting for the requests before it.
    held_flush: Option<u16>,
}

impl InFlight {
    /// Room for `size` requests (the queue's size).
    pub fn new(size: u16) -> Self {
        let size = size.max(1);
        InFlight {
            slots: (0..size).map(|_| Slot::default()).collect(),
            // Popped from the end: slot 0 first.
            free: (0..size).rev().collect(),
            submitted: 0,
            held_flush: None,
        }
    }

    /// A free slot, cleared; `None` if every slot is taken.
    pub fn alloc(&mut self) -> Option<u16> {
        let tag = self.free.pop()?;
        let slot = &mut self.slots[usize::from(tag)];
        slot.clear();
        slot.taken = true;
        Some(tag)
    }

    /// Slot `tag`.
    pub fn slot(&mut self, tag: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(tag))
    }

    /// Gives slot `tag` back (its request is in the used ring, or given up).
    pub fn release(&mut self, tag: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(tag)) {
            if std::mem::take(&mut slot.taken) {
                self.free.push(tag);
            }
        }
    }

    /// Whether the device must take no more chains for now: every slot is in use, or a flush
    /// waits for the requests before it.
    pub fn blocked(&self) -> bool {
        self.free.is_empty() || self.held_flush.is_some()
    }

    /// Whether the flush in `tag` must wait: requests taken before it are still in flight. It
    /// is then held until [`release_held_flush`](Self::release_held_flush) gives it back.
    pub fn hold_flush(&mut self, tag: u16) -> bool {
        if self.submitted == 0 {
            return false;
        }
        self.held_flush = Some(tag);
        true
    }

    /// The held flush, once nothing before it is in flight any more.
    pub fn release_held_flush(&mut self) -> Option<u16> {
        if self.submitted == 0 {
            self.held_flush.take()
        } else {
            None
        }
    }

    /// The held flush, whatever is in flight (the device is pulled out or reset: it will not
    /// be submitted).
    pub fn take_held_flush(&mut self) -> Option<u16> {
        self.held_flush.take()
    }

    /// A request was handed to the engine.
    pub fn submitted(&mut self) {
        self.submitted += 1;
    }

    /// A request came back from the engine (whole, or to be resubmitted).
    pub fn returned(&mut self) {
        self.submitted = self.submitted.saturating_sub(1);
    }

    /// Requests handed to the engine and not come back.
    pub fn in_host(&self) -> usize {
        self.submitted
    }

    /// Requests taken from the ring and not completed: in the engine, or held.
    pub fn outstanding(&self) -> usize {
        self.submitted + usize::from(self.held_flush.is_some())
    }

    /// Nothing in the engine and nothing held.
    pub fn is_idle(&self) -> bool {
        self.outstanding() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_bounded() {
        let mut f = InFlight::new(2);
        let a = f.alloc().unwrap();
        let b = f.alloc().unwrap();
        assert_ne!(a, b);
        assert!(f.alloc().is_none() && f.blocked());
        f.slot(a).unwrap().segments.push(Segment {
            addr: GuestAddress(0),
            len: 1,
        });
        f.release(a);
        f.release(a); // twice: still one free slot
        assert!(!f.blocked());
        let c = f.alloc().unwrap();
        assert_eq!(c, a);
        assert!(f.slot(c).unwrap().segments.is_empty(), "cleared");
        assert!(f.alloc().is_none());
        assert!(f.slot(7).is_none());
        f.release(7); // a tag that is no slot is ignored
        assert!(f.alloc().is_none());
    }

    /// A flush after writes in flight waits for them, and blocks what comes after it.
    #[test]
    fn a_flush_waits_for_the_requests_before_it() {
        let mut f = InFlight::new(8);
        // Nothing in flight: the flush goes at once.
        let flush = f.alloc().unwrap();
        assert!(!f.hold_flush(flush));
        f.release(flush);
        for _ in 0..2 {
            let w = f.alloc().unwrap();
            f.submitted();
            let _ = w;
        }
        let flush = f.alloc().unwrap();
        assert!(f.hold_flush(flush));
        assert!(f.blocked(), "nothing taken after a held flush");
        assert_eq!(f.outstanding(), 3);
        f.returned();
        assert_eq!(f.release_held_flush(), None, "one write still in flight");
        f.returned();
        assert_eq!(f.release_held_flush(), Some(flush));
        assert!(!f.blocked());
        assert!(f.is_idle());
    }

    #[test]
    fn a_short_transfer_resumes_where_it_stopped() {
        let mut buf = [0u8; 4096];
        let base = buf.as_mut_ptr();
        let mut s = Slot {
            kind: IoKind::Read,
            offset: 1 << 20,
            len: 4096,
            ..Slot::default()
        };
        s.iovecs.push(IoVec::new(base, 1024));
        s.iovecs.push(IoVec::new(base.wrapping_add(1024), 3072));
        assert!(!s.transferred(1536));
        match s.op() {
            HostOp::Read {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                assert_eq!(offset, (1 << 20) + 1536);
                assert_eq!(iovcnt, 1);
                // SAFETY: `iov` points into `s.iovecs`.
                let first = unsafe { *iov };
                assert_eq!(first.0.iov_base as *mut u8, base.wrapping_add(1536));
                assert_eq!(first.len(), 2560);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.transferred(2560));
        assert_eq!(s.short_by(), 0);
        // End of file: no progress, the request is over and short.
        let mut s = Slot {
            kind: IoKind::Write,
            len: 512,
            ..Slot::default()
        };
        s.iovecs.push(IoVec::new(base, 512));
        assert!(s.transferred(0));
        assert_eq!(s.short_by(), 512);
        let mut flush = Slot {
            kind: IoKind::Flush,
            ..Slot::default()
        };
        assert!(flush.transferred(0));
        assert_eq!(flush.short_by(), 0);
    }
}
