//! The engine of a qcow2 image's queue: a request whose clusters the image's direct map knows
//! goes to io_uring at their place in the image file, as a raw image's would; everything else
//! to the thread pool, through the format layer (see the `qcow2` module, "The direct path").
//!
//! Both halves signal one eventfd, so the I/O thread waits on a single completion descriptor
//! per queue whichever way a request went. Each direct request is counted with the image from
//! its [`begin_direct`](Qcow2Image::begin_direct) to the reaping of its completion, which is
//! what lets a discard wait for the requests still using the mappings it changes.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::host_io::{op_array, HostOp, HostResult, IoEngine, IoVec};
use super::qcow2::Qcow2Image;
use super::thread_pool::{Runner, ThreadPoolEngine};
use super::uring::UringEngine;

/// io_uring for the mapped clusters of a qcow2 image, the pool for the rest.
pub struct Qcow2Engine {
    image: Arc<Qcow2Image>,
    /// The image file, as the device opened it (O_DIRECT or not).
    fd: RawFd,
    direct: UringEngine,
    pool: ThreadPoolEngine,
    /// Direct requests pushed and not yet reaped.
    direct_outstanding: usize,
    /// Requests that went each way (direct, pool): what the tests check the routing by.
    counts: [u64; 2],
    completions: EventFd,
}

impl Qcow2Engine {
    /// An engine for a queue of `depth` descriptors on `image`, whose file is `fd` (the
    /// descriptor stays open as long as the engine: the device's disk holds it). `punt` as
    /// for [`UringEngine::new`].
    pub fn new(depth: u16, image: Arc<Qcow2Image>, fd: RawFd, punt: bool) -> io::Result<Self> {
        let completions = EventFd::new(EFD_NONBLOCK)?;
        Ok(Qcow2Engine {
            direct: UringEngine::with_completions(depth, punt, completions.try_clone()?)?,
            pool: ThreadPoolEngine::with_completions(
                depth,
                Runner::Qcow2(image.clone()),
                completions.try_clone()?,
            )?,
            image,
            fd,
            direct_outstanding: 0,
            counts: [0; 2],
            completions,
        })
    }

    /// Requests sent (direct, through the pool) so far.
    #[cfg(test)]
    pub fn counts(&self) -> (u64, u64) {
        (self.counts[0], self.counts[1])
    }
}

/// Total bytes of `iovcnt` `iovec`s at `iov`.
///
/// # Safety
///
/// As [`IoEngine::push`].
unsafe fn total_len(iov: *mut IoVec, iovcnt: u32) -> u64 {
    // SAFETY: the caller's contract: `iovcnt` valid entries.
    let iovs = unsafe { op_array(iov, iovcnt) };
    iovs.iter().map(|i| i.len() as u64).sum()
}

/// `op` (a read or write) at `offset` of the image file `fd` instead of the virtual disk.
fn in_file(op: HostOp, fd: RawFd, offset: u64) -> HostOp {
    match op {
        HostOp::Read { iov, iovcnt, .. } => HostOp::Read {
            fd,
            offset,
            iov,
            iovcnt,
        },
        HostOp::Write { iov, iovcnt, .. } => HostOp::Write {
            fd,
            offset,
            iov,
            iovcnt,
        },
        other => other,
    }
}

impl IoEngine for Qcow2Engine {
    unsafe fn push(&mut self, tag: u16, op: HostOp) -> io::Result<()> {
        let direct = match op {
            HostOp::Read {
                offset,
                iov,
                iovcnt,
                ..
            }
            | HostOp::Write {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                let write = matches!(op, HostOp::Write { .. });
                // SAFETY: the caller's contract.
                let len = unsafe { total_len(iov, iovcnt) };
                self.image
                    .begin_direct(offset, len, write)
                    .map(|host| in_file(op, self.fd, host))
            }
            HostOp::Flush { .. } | HostOp::Discard { .. } => None,
        };
        match direct {
            Some(op) => {
                // SAFETY: the caller's contract, for the same iovecs at the image file's
                // offset; the file stays open as long as the engine.
                if let Err(e) = unsafe { self.direct.push(tag, op) } {
                    self.image.end_direct(1);
                    return Err(e);
                }
                self.direct_outstanding += 1;
                self.counts[0] += 1;
                Ok(())
            }
            None => {
                self.counts[1] += 1;
                // SAFETY: the caller's contract.
                unsafe { self.pool.push(tag, op) }
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.direct.submit()?;
        self.pool.submit()
    }

    fn reap(&mut self, out: &mut Vec<(u16, HostResult)>) {
        // Both halves clear the shared signal before they look: whatever lands after one of
        // them cleared it is still seen by `has_completions` before the thread sleeps.
        self.pool.reap(out);
        let before = out.len();
        self.direct.reap(out);
        let direct = out.len() - before;
        self.direct_outstanding -= direct.min(self.direct_outstanding);
        self.image.end_direct(direct);
    }

    fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        self.pool.has_completions() || self.direct.has_completions()
    }

    fn name(&self) -> &'static str {
        "qcow2 (io_uring and threads)"
    }
}

impl Drop for Qcow2Engine {
    /// Direct requests never reaped (a device pulled out with requests left in the host) no
    /// longer hold up the image's discards.
    fn drop(&mut self) {
        self.image.end_direct(self.direct_outstanding);
    }
}
