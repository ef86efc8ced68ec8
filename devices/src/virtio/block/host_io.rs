//! Host I/O of virtio-blk requests, submitted asynchronously.
//!
//! A request's data moves between the image and guest memory in one host operation
//! ([`HostOp`]): a vectored read or write whose `iovec`s point straight at the guest's pages, or
//! a `fdatasync`. An [`IoEngine`] runs many of them at once and reports each completion, in
//! whatever order the host finishes them, under the tag it was submitted with (the request's
//! slot, see the `in_flight` module). Two engines:
//!
//! - [`uring`](super::uring): io_uring, one ring per queue, completions signalled on an eventfd
//!   registered with the ring. One `io_uring_enter` submits every request a notification
//!   brought; no thread per request.
//! - [`thread_pool`](super::thread_pool): a few threads per queue doing `preadv`/`pwritev`, for
//!   hosts where io_uring is unavailable (an old kernel, `kernel.io_uring_disabled`, a seccomp
//!   policy). The same `AioBackend::Threads` as QEMU's `aio=threads`.
//!
//! Nothing here allocates per request: operations are `Copy`, their `iovec` arrays belong to
//! the slots that are reused from request to request.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use super::disk::Disk;
use super::qcow2_engine::Qcow2Engine;
use super::thread_pool::{Runner, ThreadPoolEngine};

/// Which engine runs a device's host I/O (the `aio=` of QEMU's `-drive`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioBackend {
    /// io_uring where the host allows it, the thread pool otherwise.
    #[default]
    Auto,
    /// io_uring only: activation fails where it is unavailable.
    IoUring,
    /// The thread pool (`preadv`/`pwritev` on worker threads).
    Threads,
}

impl AioBackend {
    /// The name users give it (`auto`, `io_uring`, `threads`).
    pub fn name(self) -> &'static str {
        match self {
            AioBackend::Auto => "auto",
            AioBackend::IoUring => "io_uring",
            AioBackend::Threads => "threads",
        }
    }

    /// Parses [`name`](Self::name)'s spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        [AioBackend::Auto, AioBackend::IoUring, AioBackend::Threads]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

/// One `struct iovec` of a host operation: a run of guest memory.
///
/// It holds a raw pointer into guest memory, which the I/O thread owns for as long as the
/// request is in flight; the type is `Send` so that the slots holding these can move with the
/// I/O thread's context (a paused device hands its queues back to the VMM thread).
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec(pub libc::iovec);

// SAFETY: an `IoVec` is a plain address and length; whoever dereferences it (the kernel, on
// behalf of an engine) does so under the contract of `IoEngine::push`, which does not depend on
// the thread the value was created on.
unsafe impl Send for IoVec {}

impl IoVec {
    /// The run of `len` bytes at `base`.
    pub fn new(base: *mut u8, len: usize) -> Self {
        IoVec(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.iov_len
    }
}

/// One host operation. `iov`/`iovcnt` name an array of [`IoVec`]s.
#[derive(Clone, Copy, Debug)]
pub enum HostOp {
    /// `preadv(fd, iov, iovcnt, offset)`.
    Read {
        /// The image.
        fd: RawFd,
        /// Byte offset in it.
        offset: u64,
        /// The buffers.
        iov: *mut IoVec,
        /// How many.
        iovcnt: u32,
    },
    /// `pwritev(fd, iov, iovcnt, offset)`.
    Write {
        /// The image.
        fd: RawFd,
        /// Byte offset in it.
        offset: u64,
        /// The buffers.
        iov: *mut IoVec,
        /// How many.
        iovcnt: u32,
    },
    /// `fdatasync(fd)`.
    Flush {
        /// The image.
        fd: RawFd,
    },
    /// VIRTIO_BLK_T_DISCARD, or VIRTIO_BLK_T_WRITE_ZEROES with `zeroes`, over the `count`
    /// ranges at `ranges`, at the virtual disk's offsets. Only a format layer runs it (a qcow2
    /// image's, whose discards change mappings other requests use); a raw image's are done
    /// where the request is parsed, and an engine handed one refuses it.
    Discard {
        /// The ranges.
        ranges: *const DiscardRange,
        /// How many.
        count: u32,
        /// Write zeroes rather than discard.
        zeroes: bool,
    },
}

/// One range of a [`HostOp::Discard`]: a segment of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardRange {
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Write zeroes may deallocate (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`).
    pub unmap: bool,
}

// SAFETY: see `IoVec`: the pointer is only dereferenced under `IoEngine::push`'s contract.
unsafe impl Send for HostOp {}

/// Result of a host operation: bytes transferred, or an errno.
pub type HostResult = Result<usize, i32>;

/// Runs host operations concurrently; one per queue.
pub trait IoEngine: Send {
    /// Queues `op` under `tag` (submitted at the next [`submit`](Self::submit)).
    ///
    /// # Safety
    ///
    /// The `iovec` array of `op`, and the memory each `iovec` describes, must stay valid and
    /// untouched by anyone else until the completion of `tag` has been reaped; the file
    /// descriptor must stay open until then.
    unsafe fn push(&mut self, tag: u16, op: HostOp) -> io::Result<()>;

    /// Starts every operation pushed since the last call.
    fn submit(&mut self) -> io::Result<()>;

    /// Appends every completion there is to `out` as (tag, result). `out` is never grown
    /// beyond the number of operations in flight.
    fn reap(&mut self, out: &mut Vec<(u16, HostResult)>);

    /// Readable when completions are waiting to be reaped (cleared by [`reap`](Self::reap)).
    fn completion_fd(&self) -> RawFd;

    /// Whether completions are waiting, found without a system call: what the I/O thread
    /// polls for before it goes to sleep.
    fn has_completions(&mut self) -> bool;

    /// The engine's name, for logs.
    fn name(&self) -> &'static str;
}

/// Makes a queue's engine, given the queue's size: a way in for engines this crate does not
/// have (the tests' engine, whose completions the test decides).
#[cfg(test)]
pub(crate) type EngineFactory =
    std::sync::Arc<dyn Fn(u16) -> io::Result<Box<dyn IoEngine>> + Send + Sync>;

/// Where a device's engines come from.
#[derive(Clone)]
pub(crate) enum EngineSource {
    /// One of this crate's.
    Backend(AioBackend),
    /// A factory of the caller's.
    #[cfg(test)]
    Factory(EngineFactory),
}

impl EngineSource {
    /// An engine for a queue of `depth` descriptors, on `image` (none: a device pulled out,
    /// whose engine serves nothing). A qcow2 image's operations run through its format layer:
    /// with io_uring, the clusters it has mapped go straight to the image file
    /// ([`Qcow2Engine`]), the rest to the thread pool; without, all to the pool.
    pub fn open(&self, depth: u16, image: Option<&Disk>) -> io::Result<Box<dyn IoEngine>> {
        match self {
            EngineSource::Backend(backend) => {
                let may_block = image.is_some_and(Disk::submission_may_block);
                let Some((disk, qcow2)) = image.and_then(|d| Some((d, d.qcow2()?))) else {
                    return open_engine(*backend, depth, may_block);
                };
                let pool = || -> io::Result<Box<dyn IoEngine>> {
                    Ok(Box::new(ThreadPoolEngine::new(
                        depth,
                        Runner::Qcow2(qcow2.clone()),
                    )?))
                };
                let direct = || -> io::Result<Box<dyn IoEngine>> {
                    Ok(Box::new(Qcow2Engine::new(
                        depth,
                        qcow2.clone(),
                        disk.as_raw_fd(),
                        may_block,
                    )?))
                };
                match backend {
                    AioBackend::Threads => pool(),
                    AioBackend::IoUring => direct(),
                    AioBackend::Auto => direct().or_else(|e| {
                        log::info!(
                            "virtio-blk: io_uring unavailable ({e}); qcow2 on the thread pool"
                        );
                        pool()
                    }),
                }
            }
            #[cfg(test)]
            EngineSource::Factory(factory) => factory(depth),
        }
    }
}

/// Opens the engine `backend` asks for, with room for `depth` operations in flight, on an
/// image whose I/O may block the thread that submits it if `may_block` (see
/// [`Disk::submission_may_block`](super::Disk::submission_may_block)).
pub fn open_engine(
    backend: AioBackend,
    depth: u16,
    may_block: bool,
) -> io::Result<Box<dyn IoEngine>> {
    match backend {
        AioBackend::IoUring => Ok(Box::new(super::uring::UringEngine::new(depth, may_block)?)),
        AioBackend::Threads => Ok(Box::new(ThreadPoolEngine::new(depth, Runner::File)?)),
        AioBackend::Auto => match super::uring::UringEngine::new(depth, may_block) {
            Ok(engine) => Ok(Box::new(engine)),
            Err(e) => {
                log::info!("virtio-blk: io_uring unavailable ({e}); using the thread pool");
                Ok(Box::new(ThreadPoolEngine::new(depth, Runner::File)?))
            }
        },
    }
}

/// The array of `count` elements at `ptr` that an operation names (its `iovec`s, or a
/// discard's ranges), as a slice; empty for a count of 0, whatever the pointer.
///
/// # Safety
///
/// `ptr` points at `count` valid elements that outlive the returned slice and that no one
/// changes meanwhile.
pub unsafe fn op_array<'a, T>(ptr: *const T, count: u32) -> &'a [T] {
    if count == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, count as usize) }
}

/// Runs `op` on the calling thread, repeating short transfers until all of it is done (the
/// thread pool's engine, and requests served synchronously).
///
/// # Safety
///
/// As [`IoEngine::push`], for the duration of the call.
pub unsafe fn run_blocking(op: HostOp) -> HostResult {
    match op {
        HostOp::Flush { fd } => loop {
            // SAFETY: fdatasync takes no pointers.
            if unsafe { libc::fdatasync(fd) } == 0 {
                return Ok(0);
            }
            match errno() {
                libc::EINTR => continue,
                e => return Err(e),
            }
        },
        HostOp::Read {
            fd,
            offset,
            iov,
            iovcnt,
        } => {
            // SAFETY: forwarded from the caller.
            unsafe { transfer(fd, offset, iov, iovcnt, false) }
        }
        HostOp::Write {
            fd,
            offset,
            iov,
            iovcnt,
        } => {
            // SAFETY: forwarded from the caller.
            unsafe { transfer(fd, offset, iov, iovcnt, true) }
        }
        HostOp::Discard { .. } => Err(libc::EOPNOTSUPP),
    }
}

/// `preadv`/`pwritev` until every byte of the `iovec`s moved, consuming them as it goes. End of
/// file is `EIO` (the image shrank under the device).
///
/// # Safety
///
/// `iov[..iovcnt]` must be valid `iovec`s describing memory valid for the transfer, and no one
/// else may use the array meanwhile.
unsafe fn transfer(
    fd: RawFd,
    offset: u64,
    iov: *mut IoVec,
    iovcnt: u32,
    write: bool,
) -> HostResult {
    // SAFETY: the caller promises `iovcnt` valid entries at `iov`, ours alone.
    let iovs = unsafe { std::slice::from_raw_parts_mut(iov, iovcnt as usize) };
    let mut done = 0usize;
    let mut first = consume(iovs, 0);
    while first < iovs.len() {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or(libc::EINVAL)?;
        let rest = &iovs[first..];
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let ptr = rest.as_ptr().cast::<libc::iovec>();
        // SAFETY: `ptr[..cnt]` are the caller's valid iovecs (`IoVec` is a transparent
        // `iovec`).
        let n = unsafe {
            if write {
                libc::pwritev(fd, ptr, cnt, at)
            } else {
                libc::preadv(fd, ptr, cnt, at)
            }
        };
        let n = match usize::try_from(n) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => n,
            Err(_) => match errno() {
                libc::EINTR => continue,
                e => return Err(e),
            },
        };
        done += n;
        first += consume(&mut iovs[first..], n);
    }
    Ok(done)
}

/// Takes the first `n` bytes off `iovs` after a transfer of `n` bytes: returns how many
/// entries are used up (empty ones included), and shortens the next one by what of it was
/// transferred. A short transfer resumes at `iovs[returned..]`.
pub fn consume(iovs: &mut [IoVec], mut n: usize) -> usize {
    let mut i = 0;
    while i < iovs.len() && n >= iovs[i].len() {
        n -= iovs[i].len();
        i += 1;
    }
    if let Some(partial) = iovs.get_mut(i) {
        partial.0.iov_base = (partial.0.iov_base as *mut u8).wrapping_add(n).cast();
        partial.0.iov_len -= n;
    }
    i
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn names_round_trip() {
        for b in [AioBackend::Auto, AioBackend::IoUring, AioBackend::Threads] {
            assert_eq!(AioBackend::from_name(b.name()), Some(b));
        }
        assert_eq!(AioBackend::from_name("native"), None);
    }

    #[test]
    fn blocking_transfers_cross_iovecs_and_flush() {
        let tmp = TempFile::new().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        tmp.as_file().write_all_at(&data, 0).unwrap();
        let fd = tmp.as_file().as_raw_fd();
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 3000];
        let mut iov = [
            IoVec::new(a.as_mut_ptr(), a.len()),
            IoVec::new(b.as_mut_ptr(), b.len()),
        ];
        let op = HostOp::Read {
            fd,
            offset: 1000,
            iov: iov.as_mut_ptr(),
            iovcnt: 2,
        };
        // SAFETY: the buffers outlive the call.
        assert_eq!(unsafe { run_blocking(op) }, Ok(3100));
        assert_eq!(a, data[1000..1100]);
        assert_eq!(b, data[1100..4100]);
        let op = HostOp::Write {
            fd,
            offset: 8000,
            iov: iov.as_mut_ptr(),
            iovcnt: 2,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { run_blocking(op) }, Ok(3100));
        let mut back = vec![0u8; 3100];
        tmp.as_file().read_exact_at(&mut back, 8000).unwrap();
        assert_eq!(back, data[1000..4100]);
        // SAFETY: no pointers.
        assert_eq!(unsafe { run_blocking(HostOp::Flush { fd }) }, Ok(0));
        // Reading past the end: EIO, not a short success.
        let op = HostOp::Read {
            fd,
            offset: 12_000,
            iov: iov.as_mut_ptr(),
            iovcnt: 2,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { run_blocking(op) }, Err(libc::EIO));
    }

    #[test]
    fn consume_resumes_a_short_transfer_mid_iovec() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let mut iovs = [
            IoVec::new(base, 10),
            IoVec::new(base.wrapping_add(10), 0),
            IoVec::new(base.wrapping_add(10), 20),
            IoVec::new(base.wrapping_add(30), 30),
        ];
        assert_eq!(consume(&mut iovs, 0), 0);
        // 15 bytes: the first entry, the empty one, and 5 bytes of the third.
        assert_eq!(consume(&mut iovs, 15), 2);
        assert_eq!(iovs[2].0.iov_base as *mut u8, base.wrapping_add(15));
        assert_eq!(iovs[2].len(), 15);
        assert_eq!(consume(&mut iovs[2..], 15), 1);
        assert_eq!(iovs[3].len(), 30);
        assert_eq!(consume(&mut iovs[3..], 30), 1);
    }
}
