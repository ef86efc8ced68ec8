//! The io_uring engine: one ring per queue.
//!
//! Each request is one SQE (`IORING_OP_READV`, `IORING_OP_WRITEV`, `IORING_OP_FSYNC` with
//! `IORING_FSYNC_DATASYNC`) tagged with its slot; one `io_uring_enter` submits all the requests
//! a notification brought. The ring signals an eventfd registered with it when completions
//! arrive, which the I/O thread waits on beside the queue's notification eventfd.
//!
//! The ring has as many entries as the queue has descriptors, and no request is in flight
//! without a slot of its own, so neither the submission ring nor the completion ring (twice as
//! large) can overflow.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::host_io::{HostOp, HostResult, IoEngine};

/// An io_uring instance serving one queue.
pub struct UringEngine {
    ring: IoUring,
    completions: EventFd,
    /// SQEs pushed and not yet submitted.
    unsubmitted: usize,
    /// Flags of every SQE: `IOSQE_ASYNC` where the image's I/O may block the submitter.
    flags: squeue::Flags,
}

impl UringEngine {
    /// A ring with room for `depth` operations in flight. With `punt`, every operation goes to
    /// the kernel's workers (`IOSQE_ASYNC`) instead of being tried inline first: for images
    /// whose I/O can block the submitting thread (FUSE, network file systems).
    pub fn new(depth: u16, punt: bool) -> io::Result<Self> {
        Self::with_completions(depth, punt, EventFd::new(EFD_NONBLOCK)?)
    }

    /// [`new`](Self::new), signalling `completions` (which another engine may share).
    pub fn with_completions(depth: u16, punt: bool, completions: EventFd) -> io::Result<Self> {
        let entries = u32::from(depth.max(1)).next_power_of_two();
        let ring = IoUring::new(entries)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            completions,
            unsubmitted: 0,
            flags: if punt {
                squeue::Flags::ASYNC
            } else {
                squeue::Flags::empty()
            },
        })
    }
}

impl IoEngine for UringEngine {
    unsafe fn push(&mut self, tag: u16, op: HostOp) -> io::Result<()> {
        let entry = match op {
            HostOp::Read {
                fd,
                offset,
                iov,
                iovcnt,
            } => opcode::Readv::new(types::Fd(fd), iov.cast::<libc::iovec>(), iovcnt)
                .offset(offset)
                .build(),
            HostOp::Write {
                fd,
                offset,
                iov,
                iovcnt,
            } => opcode::Writev::new(types::Fd(fd), iov.cast::<libc::iovec>(), iovcnt)
                .offset(offset)
                .build(),
            HostOp::Flush { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // A format layer's operation: not for the kernel.
            HostOp::Discard { .. } => return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
        .flags(self.flags)
        .user_data(u64::from(tag));
        loop {
            // SAFETY: the caller keeps the iovecs and their memory valid until the completion
            // of `tag` is reaped (this trait method's contract).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            match pushed {
                Ok(()) => break,
                // Full only if SQEs were left unsubmitted by a failed submit: submit them.
                Err(_) => {
                    self.ring.submit()?;
                    self.unsubmitted = 0;
                }
            }
        }
        self.unsubmitted += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The SQEs stay in the ring; the next submit takes them.
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<(u16, HostResult)>) {
        // Clear the signal first: a completion arriving after this read signals again.
        let _ = self.completions.read();
        for cqe in self.ring.completion() {
            let res = cqe.result();
            let result = if res < 0 { Err(-res) } else { Ok(res as usize) };
            // Tags are slot numbers (u16) by construction.
            out.push((cqe.user_data() as u16, result));
        }
    }

    fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        // The completion ring is shared memory: reading its head and tail needs no syscall.
        !self.ring.completion().is_empty()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::engine_runs_many_requests_at_once;

    #[test]
    fn io_uring_runs_many_requests_at_once() {
        for punt in [false, true] {
            let mut engine = UringEngine::new(32, punt).unwrap();
            engine_runs_many_requests_at_once(&mut engine);
        }
    }
}
