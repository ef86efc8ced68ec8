//! The backing file of a virtio-blk device: a raw image, addressed in 512-byte sectors.
//!
//! Data moves between the file and guest memory with `pread`/`pwrite` straight on the guest's
//! pages (through vm-memory's [`VolatileSlice`]), never through an intermediate buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::virtio::GuestRam;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

/// Sector size of the virtio-blk protocol: `sector` fields and `capacity` count 512-byte units
/// whatever `blk_size` says (Virtio 1.2 §5.2.4, §5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Chunk of zeros written when the filesystem cannot zero a range itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// A raw disk image opened for a virtio-blk device.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    readonly: bool,
}

/// What a `pread`/`pwrite` return value means: bytes transferred, an error, or `None` when
/// the call was interrupted by a signal and must be repeated.
fn transferred(ret: isize) -> Option<io::Result<usize>> {
    match usize::try_from(ret) {
        Ok(n) => Some(Ok(n)),
        Err(_) => {
            let err = io::Error::last_os_error();
            (err.kind() != io::ErrorKind::Interrupted).then_some(Err(err))
        }
    }
}

impl Disk {
    /// Opens `path`, read-only when `readonly` is set (and then never written).
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        Self::from_file(file, readonly)
    }

    /// Uses an already-open `file`. The capacity is the file size in whole sectors: a trailing
    /// partial sector is not addressable by the guest.
    pub fn from_file(file: File, readonly: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Disk {
            file,
            capacity: size >> SECTOR_SHIFT,
            readonly,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk refuses writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Byte offset of `len` bytes starting at `sector`, if the whole range lies within the disk
    /// (no arithmetic overflow possible).
    pub fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        (end <= self.capacity.checked_mul(SECTOR_SIZE)?).then_some(start)
    }

    /// Reads `len` bytes at file offset `offset` into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        mem: &GuestRam,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|_| efault())?;
            let mut done = 0;
            while done < slice.len() {
                let n = self.pread_into(&slice, done, offset)?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to file offset `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestRam,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|_| efault())?;
            let mut done = 0;
            while done < slice.len() {
                let n = self.pwrite_from(&slice, done, offset)?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// One `pread` into `slice[from..]`; end of file is an error (the image shrank under us).
    fn pread_into<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        from: usize,
        offset: u64,
    ) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let guard = slice.ptr_guard_mut();
        let want = slice.len() - from;
        loop {
            // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory that stay
            // mapped while `slice` (and the guest memory it borrows) lives; `from < slice.len()`
            // so `ptr + from .. ptr + from + want` stays inside it. The kernel writes those bytes
            // like a DMA engine would; guest memory is only ever accessed volatilely.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(from).cast(),
                    want,
                    offset,
                )
            };
            match transferred(n) {
                Some(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(Ok(n)) => {
                    slice.bitmap().mark_dirty(from, n);
                    return Ok(n);
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
    }

    /// One `pwrite` from `slice[from..]`.
    fn pwrite_from<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        from: usize,
        offset: u64,
    ) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let guard = slice.ptr_guard();
        let want = slice.len() - from;
        loop {
            // SAFETY: as in `pread_into`; the kernel only reads the `want` bytes at
            // `ptr + from`, which lie inside the mapped slice.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(from).cast(),
                    want,
                    offset,
                )
            };
            match transferred(n) {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(result) => return result,
                None => {}
            }
        }
    }

    /// Makes completed writes durable (`fdatasync`). A read-only disk has nothing to flush.
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Discard (§5.2.6): deallocates the byte range if the filesystem can punch holes; otherwise
    /// does nothing, which the specification allows ("the device MAY deallocate").
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Write zeroes (§5.2.6): afterwards the range reads as zeros. With `unmap`, tries to
    /// deallocate it (punch a hole); otherwise, or if that fails, asks the filesystem to zero it
    /// (`FALLOC_FL_ZERO_RANGE`), and as a last resort writes zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zeroes_slowly(offset, len),
            other => other,
        }
    }

    fn write_zeroes_slowly(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
        let len = libc::off_t::try_from(len).map_err(|_| einval())?;
        loop {
            // SAFETY: fallocate takes no pointers; the descriptor is owned by `self.file`.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

fn efault() -> io::Error {
    io::Error::from_raw_os_error(libc::EFAULT)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;
    use vmm_sys_util::tempfile::TempFile;

    fn disk_with(content: &[u8], readonly: bool) -> (TempFile, Disk) {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all_at(content, 0).unwrap();
        let disk = Disk::open(tmp.as_path(), readonly).unwrap();
        (tmp, disk)
    }

    #[test]
    fn capacity_ignores_trailing_partial_sector() {
        let (_t, disk) = disk_with(&[7u8; 1024 + 100], false);
        assert_eq!(disk.capacity(), 2);
        assert_eq!(disk.byte_range(0, 1024), Some(0));
        assert_eq!(disk.byte_range(1, 512), Some(512));
        assert_eq!(disk.byte_range(1, 1024), None);
        assert_eq!(disk.byte_range(2, 0), Some(1024));
        assert_eq!(disk.byte_range(3, 0), None);
        assert_eq!(disk.byte_range(u64::MAX, 512), None);
        assert_eq!(disk.byte_range(u64::MAX >> 9, 512), None);
        assert_eq!(disk.byte_range(0, u64::MAX), None);
    }

    #[test]
    fn round_trip_through_guest_memory_spanning_regions() {
        let mem =
            GuestRam::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let pattern: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
        let (_t, disk) = disk_with(&pattern, false);
        // 0x800 bytes across the boundary between the two regions.
        disk.read_to_guest(&mem, GuestAddress(0xc00), 0x800, 0)
            .unwrap();
        let mut back = vec![0u8; 0x800];
        mem.read_slice(&mut back, GuestAddress(0xc00)).unwrap();
        assert_eq!(back, pattern[..0x800]);
        disk.write_from_guest(&mem, GuestAddress(0xc00), 0x200, 0x600)
            .unwrap();
        let mut file_back = vec![0u8; 0x200];
        disk.file.read_exact_at(&mut file_back, 0x600).unwrap();
        assert_eq!(file_back, pattern[..0x200]);
    }

    #[test]
    fn guest_range_outside_memory_fails() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let (_t, disk) = disk_with(&[0u8; 4096], false);
        assert!(disk
            .read_to_guest(&mem, GuestAddress(0xf00), 0x200, 0)
            .is_err());
        assert!(disk
            .write_from_guest(&mem, GuestAddress(0x10_0000), 0x200, 0)
            .is_err());
    }

    #[test]
    fn readonly_refuses_every_write() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let (_t, disk) = disk_with(&[1u8; 4096], true);
        assert!(disk
            .write_from_guest(&mem, GuestAddress(0), 512, 0)
            .is_err());
        assert!(disk.discard(0, 512).is_err());
        assert!(disk.write_zeroes(0, 512, false).is_err());
        assert!(disk.flush().is_ok());
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_range() {
        let (_t, disk) = disk_with(&[0xaau8; 16384], false);
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(8192, 4096, true).unwrap();
        disk.discard(12288, 4096).unwrap();
        let mut buf = vec![0u8; 16384];
        disk.file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(disk.file.metadata().unwrap().len(), 16384);
        disk.write_zeroes_slowly(0, 100).unwrap();
        disk.file.read_exact_at(&mut buf[..101], 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert_eq!(buf[100], 0xaa);
    }
}
