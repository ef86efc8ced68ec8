//! A qcow2 image, through the `imago` crate (synchronous interface).
//!
//! The guest's reads and writes address the virtual disk; imago maps them to clusters of the
//! image file — allocating on first write, copying from the backing file, reading zero and
//! compressed clusters — and keeps the L2 and refcount tables cached. Its operations block, so
//! the device runs them on its thread pool ([`Runner::Qcow2`](super::thread_pool::Runner)),
//! never on the I/O thread; the `iovec`s still point straight at guest memory.
//!
//! Discards invalidate mappings other requests may be using, so they take the image
//! exclusively ([`RwLock`]); everything else shares it.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};

use super::host_io::{HostOp, HostResult, IoVec};

type Access = FormatAccess<imago::file::File>;

/// An open qcow2 image (and its backing chain).
#[derive(Debug)]
pub struct Qcow2Image {
    access: RwLock<Access>,
    size: u64,
}

impl Qcow2Image {
    /// Opens the qcow2 image in `file` (a descriptor of the caller's, duplicated), writable
    /// unless `readonly`. `path` is where its backing file's relative name is resolved from;
    /// backing files are opened read-only. A descriptor opened with `O_DIRECT` keeps it, and
    /// imago aligns its own buffers to it.
    pub fn open(file: &File, path: &Path, readonly: bool) -> io::Result<Self> {
        // SAFETY: F_GETFL takes no pointer; the descriptor is the caller's open file.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let direct = flags >= 0 && flags & libc::O_DIRECT != 0;
        let storage = imago::file::File::from_open_file(
            file.try_clone()?,
            StorageOpenOptions::new()
                .filename(path)
                .write(!readonly)
                .direct(direct),
        )?;
        let qcow2 = Qcow2::<imago::file::File>::builder(storage)
            .write(!readonly)
            .open(PermissiveImplicitOpenGate::default())?;
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Qcow2Image {
            access: RwLock::new(access),
            size,
        })
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn shared(&self) -> RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op`, whose offsets address the virtual disk; returns the bytes moved.
    ///
    /// # Safety
    ///
    /// As [`IoEngine::push`](super::host_io::IoEngine::push): the `iovec`s and the memory they
    /// describe stay valid, and untouched by anyone else, until this returns.
    pub unsafe fn run(&self, op: HostOp) -> HostResult {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        match op {
            HostOp::Read {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                // SAFETY: the caller's contract.
                let iovs = unsafe { iovecs(iov, iovcnt) };
                let mut v = IoVectorMut::with_capacity(iovs.len());
                for i in iovs.iter().filter(|i| i.len() > 0) {
                    // SAFETY: the caller's contract: the run is valid guest memory no one else
                    // touches meanwhile.
                    let s = unsafe { std::slice::from_raw_parts_mut(i.0.iov_base.cast(), i.len()) };
                    v.push_ioslice(IoSliceMut::new(s));
                }
                let len = v.len() as usize;
                self.shared().readv(v, offset).map_err(errno)?;
                Ok(len)
            }
            HostOp::Write {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                // SAFETY: the caller's contract.
                let iovs = unsafe { iovecs(iov, iovcnt) };
                let mut v = IoVector::with_capacity(iovs.len());
                for i in iovs.iter().filter(|i| i.len() > 0) {
                    // SAFETY: as for reads.
                    let s = unsafe { std::slice::from_raw_parts(i.0.iov_base.cast(), i.len()) };
                    v.push_ioslice(IoSlice::new(s));
                }
                let len = v.len() as usize;
                self.shared().writev(v, offset).map_err(errno)?;
                Ok(len)
            }
            HostOp::Flush { .. } => {
                self.flush().map_err(errno)?;
                Ok(0)
            }
        }
    }

    /// Writes the cached metadata back and makes everything written durable.
    pub fn flush(&self) -> io::Result<()> {
        let access = self.shared();
        access.flush()?;
        access.sync()
    }

    /// Afterwards `len` bytes at `offset` read as zeros: zero clusters where whole clusters are
    /// covered, zeros written elsewhere. With `unmap`, the clusters are also freed.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            let mut access = self.access.write().unwrap_or_else(|e| e.into_inner());
            access.discard_to_zero(offset, len)
        } else {
            self.shared().write_zeroes(offset, len)
        }
    }

    /// Frees the clusters wholly inside the range, where the image can (what they read
    /// afterwards is unspecified, as for a discard).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut access = self.access.write().unwrap_or_else(|e| e.into_inner());
        match access.discard_to_any(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }
}

/// The `iovec` array of an operation.
///
/// # Safety
///
/// `iov` points at `iovcnt` valid `IoVec`s that outlive the returned slice.
unsafe fn iovecs<'a>(iov: *mut IoVec, iovcnt: u32) -> &'a [IoVec] {
    if iovcnt == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) }
}
