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
//!
//! # The direct path
//!
//! Most of a used image is clusters already allocated in the image file, and reading or
//! overwriting one needs no format work at all: only the cluster's place in the file. So the
//! image keeps a map of the virtual disk's 64 KiB units whose data lies contiguously in the
//! image file itself ([`DirectMap`]), learnt from imago's tables after each operation the pool
//! ran (and some way ahead of it), and the device's engine
//! ([`Qcow2Engine`](super::qcow2_engine::Qcow2Engine)) sends a request whose units are all in
//! it straight to io_uring at the mapped offset, like a raw image's: no thread hand-off, no
//! format layer. Everything else — unallocated clusters, backing files, compressed clusters,
//! zero clusters, the first write to a cluster, flushes, discards — goes to the pool.
//!
//! A mapping is only stable until the next discard or write-zeroes frees or zeroes the
//! cluster. Those run exclusively: they empty the map first, so that no new request goes the
//! direct way, and then wait until the direct requests already in the host are done
//! ([`Qcow2Image::end_direct`]) — otherwise a write still in flight to a freed cluster could
//! land after the cluster was given to other data, or to the image's own tables. A write that
//! allocates never moves data another request is using, and a cluster the map calls writable
//! (allocated, not compressed, referenced once) stays so until it is discarded.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use imago::format::gate::ImplicitOpenGate;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, StorageOpenOptions};

use super::disk::open_image_with_flags;
use super::host_io::{op_array, DiscardRange, HostOp, HostResult};

type Access = FormatAccess<imago::file::File>;

/// Bytes of the virtual disk one entry of the direct map covers: 64 KiB, qcow2's default
/// cluster size (smaller clusters work, if they lie contiguously).
const UNIT_BITS: u32 = 16;
const UNIT: u64 = 1 << UNIT_BITS;
/// Most entries of a direct map: 16 bytes each, 512 KiB covering 2 GiB of disk. A larger disk
/// shares entries (the map is direct-mapped, each entry tagged with its unit).
const MAX_UNITS: u64 = 32 * 1024;
/// How far past an operation the pool ran the map is learnt from imago's (cached) tables.
const LEARN_AHEAD: u64 = 16 << 20;
/// Most extents looked up at one learning, however fragmented the image.
const LEARN_EXTENTS: usize = 64;
/// Most units one direct request spans (4 MiB); a longer one goes to the pool.
const MAX_DIRECT_UNITS: u64 = 64;
/// The low bit of a mapped host offset (a multiple of 512): the unit may be written in place.
const WRITABLE: u64 = 1;

/// The units of the virtual disk known to lie in the image file, and the requests using them.
#[derive(Debug, Default)]
struct DirectMap {
    /// Entry `u % len` holds unit `u` as (`u + 1`, host offset | [`WRITABLE`]); `(0, _)` is
    /// empty. Allocated at the first unit learnt.
    entries: Vec<(u64, u64)>,
    /// Direct requests in the host ([`Qcow2Image::begin_direct`] without its `end_direct`).
    in_flight: usize,
}

/// An open qcow2 image (and its backing chain).
#[derive(Debug)]
pub struct Qcow2Image {
    access: RwLock<Access>,
    size: u64,
    /// Address of the storage object holding the top image's data, if it is the image file
    /// itself (no external data file): what a direct mapping must point into.
    top: usize,
    /// Entries a direct map has.
    units: usize,
    direct: Mutex<DirectMap>,
    /// Signalled when the last direct request ends.
    drained: Condvar,
}

/// Opens the files an image names (its backing file, an external data file, and theirs) as
/// the image's own file was opened: by [`open_image`](super::disk::open_image), so that a FIFO
/// named as a backing file is refused instead of blocking the open for good, and anything but
/// a regular file or a block device is refused with what it is. Formats are opened by imago's
/// drivers, their files through this gate again.
#[derive(Clone, Copy, Debug, Default)]
struct ImageFileGate;

impl ImplicitOpenGate<imago::file::File> for ImageFileGate {
    fn open_format<F: FormatDriverBuilder<imago::file::File>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<imago::file::File>> {
        Ok(FormatAccess::new(builder.open(*self)?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<imago::file::File> {
        let path = opts.get_filename().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a file the image names has no name",
            )
        })?;
        let direct = if opts.get_direct() { libc::O_DIRECT } else { 0 };
        let file = open_image_with_flags(path, !opts.get_writable(), direct)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        imago::file::File::from_open_file(file, opts)
    }
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
            .open(ImageFileGate)?;
        let external = qcow2.requires_external_data_file();
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        // The top image's own storage comes last, its data file after it if it has one.
        let top = match access.inner().collect_storage_dependencies().last() {
            Some(&storage) if !external => std::ptr::from_ref(storage) as usize,
            _ => 0,
        };
        Ok(Qcow2Image {
            access: RwLock::new(access),
            size,
            top,
            units: size.div_ceil(UNIT).clamp(1, MAX_UNITS) as usize,
            direct: Mutex::new(DirectMap::default()),
            drained: Condvar::new(),
        })
    }

    /// The virtual disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn shared(&self) -> RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    fn direct_map(&self) -> MutexGuard<'_, DirectMap> {
        self.direct.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where in the image file the `len` bytes at `offset` of the virtual disk lie, if the
    /// direct map knows them to lie there contiguously (and, to `write`, writable in place).
    /// `Some` starts a direct request: the caller must call [`end_direct`](Self::end_direct)
    /// once its host I/O is over, and until then no discard changes the mapping. Never
    /// blocks on the image (only on the map's lock, held briefly): the I/O thread calls it.
    pub fn begin_direct(&self, offset: u64, len: u64, write: bool) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let first = offset >> UNIT_BITS;
        let last = offset.checked_add(len - 1)? >> UNIT_BITS;
        if last - first >= MAX_DIRECT_UNITS {
            return None;
        }
        let mut map = self.direct_map();
        if map.entries.is_empty() {
            return None;
        }
        let mut start = None;
        for u in first..=last {
            let (tag, host) = map.entries[(u % map.entries.len() as u64) as usize];
            if tag != u + 1 || (write && host & WRITABLE == 0) {
                return None;
            }
            let host = host & !WRITABLE;
            match start {
                None => start = Some(host),
                // Each further unit must follow the first one in the file.
                Some(s) if host == s + ((u - first) << UNIT_BITS) => {}
                Some(_) => return None,
            }
        }
        map.in_flight += 1;
        Some(start? + (offset & (UNIT - 1)))
    }

    /// Ends `n` direct requests (their host I/O is over, or will never be waited for).
    pub fn end_direct(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut map = self.direct_map();
        map.in_flight = map.in_flight.saturating_sub(n);
        if map.in_flight == 0 {
            self.drained.notify_all();
        }
    }

    /// Direct requests in the host.
    #[cfg(test)]
    pub fn direct_in_flight(&self) -> usize {
        self.direct_map().in_flight
    }

    /// Learns the mappings of the units from `offset`'s to [`LEARN_AHEAD`] past `end` from
    /// imago's tables (the pool just used them: they are cached). `access` is held shared, so
    /// no discard runs meanwhile.
    fn learn(&self, access: &Access, offset: u64, end: u64) {
        if self.top == 0 {
            return;
        }
        let mut pos = offset & !(UNIT - 1);
        let stop = end.saturating_add(LEARN_AHEAD).min(self.size);
        for _ in 0..LEARN_EXTENTS {
            if pos >= stop {
                break;
            }
            let Ok((mapping, len)) = access.get_mapping(pos, stop - pos) else {
                break;
            };
            if len == 0 {
                break;
            }
            if let Mapping::Raw {
                storage,
                offset: host,
                writable,
                ..
            } = mapping
            {
                if std::ptr::from_ref(storage) as usize == self.top && host % 512 == 0 {
                    self.insert(pos, len, host | if writable { WRITABLE } else { 0 });
                }
            }
            pos += len;
        }
    }

    /// Records that the `len` bytes at `pos` lie at `host` (with its [`WRITABLE`] bit): every
    /// unit wholly inside.
    fn insert(&self, pos: u64, len: u64, host: u64) {
        let mut map = self.direct_map();
        if map.entries.is_empty() {
            map.entries = vec![(0, 0); self.units];
        }
        let slots = map.entries.len() as u64;
        let (flags, host) = (host & WRITABLE, host & !WRITABLE);
        let mut u = pos.div_ceil(UNIT);
        while (u + 1) << UNIT_BITS <= pos + len {
            let at = host + ((u << UNIT_BITS) - pos);
            map.entries[(u % slots) as usize] = (u + 1, at | flags);
            u += 1;
        }
    }

    /// Takes the image exclusively to change mappings: forgets the direct map, so that no
    /// new request goes the direct way, and waits for the direct requests in the host. The
    /// I/O thread must not call it (it ends those requests): the pool does.
    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, Access> {
        let access = self.access.write().unwrap_or_else(|e| e.into_inner());
        let mut map = self.direct_map();
        map.entries.iter_mut().for_each(|e| *e = (0, 0));
        while map.in_flight > 0 {
            map = self.drained.wait(map).unwrap_or_else(|e| e.into_inner());
        }
        access
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
                let iovs = unsafe { op_array(iov, iovcnt) };
                let mut v = IoVectorMut::with_capacity(iovs.len());
                for i in iovs.iter().filter(|i| i.len() > 0) {
                    // SAFETY: the caller's contract: the run is valid guest memory no one else
                    // touches meanwhile.
                    let s = unsafe { std::slice::from_raw_parts_mut(i.0.iov_base.cast(), i.len()) };
                    v.push_ioslice(IoSliceMut::new(s));
                }
                let len = v.len();
                let access = self.shared();
                access.readv(v, offset).map_err(errno)?;
                self.learn(&access, offset, offset + len);
                Ok(len as usize)
            }
            HostOp::Write {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                // SAFETY: the caller's contract.
                let iovs = unsafe { op_array(iov, iovcnt) };
                let mut v = IoVector::with_capacity(iovs.len());
                for i in iovs.iter().filter(|i| i.len() > 0) {
                    // SAFETY: as for reads.
                    let s = unsafe { std::slice::from_raw_parts(i.0.iov_base.cast(), i.len()) };
                    v.push_ioslice(IoSlice::new(s));
                }
                let len = v.len();
                let access = self.shared();
                access.writev(v, offset).map_err(errno)?;
                self.learn(&access, offset, offset + len);
                Ok(len as usize)
            }
            HostOp::Flush { .. } => {
                self.flush().map_err(errno)?;
                Ok(0)
            }
            HostOp::Discard {
                ranges,
                count,
                zeroes,
            } => {
                // SAFETY: the caller's contract: `count` valid ranges at `ranges`.
                let ranges: &[DiscardRange] = unsafe { op_array(ranges, count) };
                for r in ranges {
                    if zeroes {
                        self.write_zeroes(r.offset, r.len, r.unmap)
                    } else {
                        self.discard(r.offset, r.len)
                    }
                    .map_err(errno)?;
                }
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
    /// covered, zeros written elsewhere. With `unmap`, the clusters are also freed. Waits for
    /// the direct requests in the host (see the module docs): not for the I/O thread.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mut access = self.exclusive();
        if unmap {
            access.discard_to_zero(offset, len)
        } else {
            access.write_zeroes(offset, len)
        }
    }

    /// Frees the clusters wholly inside the range, where the image can (what they read
    /// afterwards is unspecified, as for a discard). Waits for the direct requests in the
    /// host, as [`write_zeroes`](Self::write_zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut access = self.exclusive();
        match access.discard_to_any(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }
}
