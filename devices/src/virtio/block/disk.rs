//! The backing file of a virtio-blk device: an image, raw or qcow2, addressed in 512-byte
//! sectors.
//!
//! Data moves between the image and guest memory straight on the guest's pages, never through
//! an intermediate buffer: the I/O thread hands the kernel `iovec`s into guest memory (see the
//! `host_io` module) — for a raw image at the file's own offsets, for a qcow2 image through
//! `imago` on the device's thread pool (see the `qcow2` module). This file knows the image's
//! format and size and does what is not data transfer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use super::image_format::{is_format_header, ImageFormat};
use super::qcow2::Qcow2Image;

/// Sector size of the virtio-blk protocol: `sector` fields and `capacity` count 512-byte units
/// whatever `blk_size` says (Virtio 1.2 §5.2.4, §5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Chunk of zeros written when the filesystem cannot zero a range itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Opens the image file at `path` for a disk, read-write unless `readonly`: a regular file or a
/// block device, nothing else.
///
/// The open itself never blocks: a FIFO (or a character device) given as a disk would stop an
/// ordinary `open` until a writer comes, and its first read until data does, holding up the
/// command that named it for good. So the file is opened with `O_NONBLOCK`, refused unless it is
/// a regular file or a block device (a directory with an "is a directory" error, anything else
/// naming what it is), and its flag cleared for the I/O to come.
pub fn open_image(path: &Path, readonly: bool) -> io::Result<File> {
    open_image_with_flags(path, readonly, 0)
}

/// [`open_image`] with more `open(2)` flags (`O_DIRECT`), kept on the file.
pub(super) fn open_image_with_flags(path: &Path, readonly: bool, flags: i32) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EISDIR) => not_an_image("a directory"),
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    let what = if kind.is_file() || kind.is_block_device() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() {
        Some("a character device")
    } else {
        Some("not a file")
    };
    if let Some(what) = what {
        return Err(not_an_image(what));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no pointers are passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn not_an_image(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}: a disk image is a regular file or a block device"),
    )
}

/// A disk image opened for a virtio-blk device.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    readonly: bool,
    /// The file lives on a file system whose I/O can block the thread that submits it.
    submission_may_block: bool,
    format: ImageFormat,
    /// Raw because no header was found, not because the user said so: the guest may not write
    /// one (see the `image_format` module).
    probed_raw: bool,
    /// The qcow2 layer, for a qcow2 image.
    qcow2: Option<Arc<Qcow2Image>>,
}

impl AsRawFd for Disk {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Disk {
    /// Opens the raw image at `path`, read-only when `readonly` is set (and then never
    /// written).
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        Self::open_format(path, readonly, Some(ImageFormat::Raw))
    }

    /// Opens the image at `path` in `format`, or in the format its first bytes show when
    /// `format` is `None` ([`ImageFormat::probe`]).
    pub fn open_format(
        path: &Path,
        readonly: bool,
        format: Option<ImageFormat>,
    ) -> io::Result<Self> {
        Self::from_file_format(open_image(path, readonly)?, path, readonly, format)
    }

    /// Uses an already-open raw image `file`. The capacity is the file size in whole sectors:
    /// a trailing partial sector is not addressable by the guest.
    pub fn from_file(file: File, readonly: bool) -> io::Result<Self> {
        Self::from_file_format(file, Path::new(""), readonly, Some(ImageFormat::Raw))
    }

    /// Uses an already-open image `file` in `format` (probed when `None`). `path` is where it
    /// was opened from: a qcow2 image's relative backing file name is resolved from there.
    pub fn from_file_format(
        file: File,
        path: &Path,
        readonly: bool,
        format: Option<ImageFormat>,
    ) -> io::Result<Self> {
        let probed = format.is_none();
        let format = match format {
            Some(f) => f,
            None => ImageFormat::probe(&file)?,
        };
        let (size, qcow2) = match format {
            ImageFormat::Raw => (file.metadata()?.len(), None),
            ImageFormat::Qcow2 => {
                let image = Qcow2Image::open(&file, path, readonly)?;
                (image.size(), Some(Arc::new(image)))
            }
        };
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        // SAFETY: fstatfs fills the buffer it is given, which has room for one `statfs`.
        let ret = unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) };
        // SAFETY: zero-initialised, and filled by fstatfs when it succeeded.
        let fs = unsafe { fs.assume_init() };
        // `f_type` is an i64 on x86_64, narrower on some other targets.
        #[allow(clippy::useless_conversion)]
        let f_type = if ret == 0 { i64::from(fs.f_type) } else { 0 };
        Ok(Disk {
            file,
            capacity: size >> SECTOR_SHIFT,
            readonly,
            submission_may_block: submission_may_block(f_type),
            format,
            probed_raw: probed && format == ImageFormat::Raw,
            qcow2,
        })
    }

    /// The image file's metadata (which file it is, and how big), from the open file.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Whether its raw format was probed rather than given: the guest may then not write an
    /// image format's header to its first sector ([`Disk::write_allowed`]).
    pub fn probed_raw(&self) -> bool {
        self.probed_raw
    }

    /// Whether a guest write at byte `offset` whose data starts with `head` may go ahead: not
    /// if it would make a probed raw image look like another format.
    pub fn write_allowed(&self, offset: u64, head: &[u8]) -> bool {
        !(self.probed_raw && offset == 0 && is_format_header(head))
    }

    /// The qcow2 layer, for a qcow2 image.
    pub(super) fn qcow2(&self) -> Option<&Arc<Qcow2Image>> {
        self.qcow2.as_ref()
    }

    /// Whether I/O on the image may block the thread that submits it, even through io_uring:
    /// the image lives on FUSE or a network file system (see the function `submission_may_block` of this module).
    pub fn submission_may_block(&self) -> bool {
        self.submission_may_block
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

    /// Makes completed writes durable (`fdatasync`). A read-only disk has nothing to flush.
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        match &self.qcow2 {
            Some(q) => q.flush(),
            None => self.file.sync_data(),
        }
    }

    /// Discard (§5.2.6): deallocates the byte range if the filesystem can punch holes (a qcow2
    /// image: frees the clusters wholly inside it); otherwise does nothing, which the
    /// specification allows ("the device MAY deallocate").
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if let Some(q) = &self.qcow2 {
            return q.discard(offset, len);
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
    /// (`FALLOC_FL_ZERO_RANGE`), and as a last resort writes zeros. A qcow2 image makes zero
    /// clusters (freeing them with `unmap`) and writes zeros around them.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if let Some(q) = &self.qcow2 {
            return q.write_zeroes(offset, len, unmap);
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

/// Whether I/O on a file system of type `f_type` (`statfs.f_type`) can block the thread that
/// submits it to io_uring. io_uring issues a read or write inline, in `io_uring_enter`, when the
/// file claims to support non-blocking I/O, and hands it to a kernel worker only if the attempt
/// would block; FUSE and the network file systems may block anyway — a FUSE file opened with
/// `direct_io` waits in `request_wait_answer` for its daemon inside `io_uring_enter` (Linux 6.18,
/// measured: the device's I/O thread stayed there until the daemon answered). Their requests are
/// sent to the kernel's workers from the start (`IOSQE_ASYNC`), so that the I/O thread never
/// waits for a backend: a dead network disk must not stall the device's other queues, its
/// pause, or its surprise removal.
pub fn submission_may_block(f_type: i64) -> bool {
    const FUSE: i64 = 0x6573_5546;
    const NFS: i64 = 0x6969;
    const SMB2: i64 = 0xfe53_4d42;
    const CIFS: i64 = 0xff53_4d42;
    const V9FS: i64 = 0x0102_1997;
    const CEPH: i64 = 0x00c3_6400;
    const AFS: i64 = 0x5346_414f;
    const GFS2: i64 = 0x0116_1970;
    const OCFS2: i64 = 0x7461_636f;
    [FUSE, NFS, SMB2, CIFS, V9FS, CEPH, AFS, GFS2, OCFS2].contains(&f_type)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn disk_with(content: &[u8], readonly: bool) -> (TempFile, Disk) {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all_at(content, 0).unwrap();
        let disk = Disk::open(tmp.as_path(), readonly).unwrap();
        (tmp, disk)
    }

    /// `open_image(path, readonly)` on another thread: its answer, or a failure when it has
    /// not answered in 10 s (a FIFO's open or read blocks until a writer comes).
    fn open_within_10s(path: &Path, readonly: bool) -> io::Result<File> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || tx.send(open_image(&path, readonly)));
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening the image blocked")
    }

    #[test]
    fn only_regular_files_and_block_devices_are_images_and_none_blocks_the_open() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let fifo = dir.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for readonly in [true, false] {
            let e = open_within_10s(&fifo, readonly).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains("it is a FIFO"), "{e}");
            let e = open_within_10s(dir.as_path(), readonly).unwrap_err();
            assert!(e.to_string().contains("directory"), "{e}");
        }
        let e = open_within_10s(Path::new("/dev/null"), true).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");

        // A regular file opens, and without O_NONBLOCK left on it.
        let tmp = TempFile::new().unwrap();
        let file = open_within_10s(tmp.as_path(), false).unwrap();
        // SAFETY: F_GETFL takes no pointer.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
    }

    /// An image larger than the host's disk is thin provisioning, not an error: it opens, the
    /// guest sees its whole size, and its last sector is written where the host has room. (A
    /// write the host cannot store fails with ENOSPC and goes the way of every backend error:
    /// an I/O error to the guest, counted and reported.)
    #[test]
    fn an_image_larger_than_the_hosts_disk_opens_with_its_whole_size() {
        let tmp = TempFile::new().unwrap();
        // 2 TiB, sparse: more than the disks these tests run on (ext4 holds files to 16 TiB).
        let size = 2u64 << 40;
        tmp.as_file().set_len(size).unwrap();
        let disk = Disk::open(tmp.as_path(), false).unwrap();
        assert_eq!(disk.capacity(), size / SECTOR_SIZE);
        disk.file.write_all_at(b"last", size - SECTOR_SIZE).unwrap();
        let mut back = [0u8; 4];
        disk.file
            .read_exact_at(&mut back, size - SECTOR_SIZE)
            .unwrap();
        assert_eq!(&back, b"last");
    }

    #[test]
    fn network_and_fuse_file_systems_may_block_submissions() {
        assert!(submission_may_block(0x6573_5546), "FUSE");
        assert!(submission_may_block(0x6969), "NFS");
        assert!(!submission_may_block(0xef53), "ext4");
        assert!(!submission_may_block(0x5846_5342), "XFS");
        assert!(!submission_may_block(0x0102_1994), "tmpfs");
        let (_t, disk) = disk_with(&[0u8; 512], false);
        // Temporary files are local.
        assert!(!disk.submission_may_block());
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
    fn readonly_refuses_every_write() {
        let (_t, disk) = disk_with(&[1u8; 4096], true);
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
