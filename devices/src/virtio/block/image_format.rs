//! Disk image formats: which ones a device opens, and how an image's format is found when the
//! user does not say (the way `qemu-img info` probes).
//!
//! Probing is safe only in one direction. An image whose first bytes are a format's header is
//! that format; an image without one is raw — but the guest owns a raw image's first sector and
//! can write a qcow2 header there, naming any host file as its backing file, which the next
//! probe would then open (QEMU's CVE-2008-2004). So a disk *probed* as raw refuses guest writes
//! that would put a known header in sector 0 ([`is_format_header`]), as QEMU restricts block 0
//! of a probed raw image; a user who names `format=raw` gets the bytes as they are.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// An image's format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The file's bytes are the disk's.
    #[default]
    Raw,
    /// QEMU's copy-on-write format (version 2 or 3), through the `imago` crate: clusters
    /// allocated on write, backing files, zero clusters, compressed clusters (read).
    Qcow2,
}

/// The first bytes of a qcow2 image (QFI\xfb).
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Headers of formats QEMU knows, at offset 0, with their names: what a probed raw image must
/// never start to look like, and what a probe recognises without opening.
const KNOWN_HEADERS: &[(&[u8], &str)] = &[
    (&QCOW2_MAGIC, "qcow2"),
    (b"QFI", "qcow"),
    (b"QED\0", "qed"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"COWD", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (b"<<< Sun xVM VirtualBox Disk Image >>>", "vdi"),
    (b"<<< Sun VirtualBox Disk Image >>>", "vdi"),
    (b"<<< innotek VirtualBox Disk Image >>>", "vdi"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format", "cloop"),
];

/// Longest header in [`KNOWN_HEADERS`].
pub const HEADER_PROBE_BYTES: usize = 64;

impl ImageFormat {
    /// The name users give it (`raw`, `qcow2`: QEMU's driver names).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses [`name`](Self::name)'s spelling.
    pub fn from_name(name: &str) -> Option<Self> {
        [ImageFormat::Raw, ImageFormat::Qcow2]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The format of the image in `file`, from its first bytes: qcow2 if it has qcow2's
    /// header, raw if it has no header QEMU would recognise; an error naming the format
    /// otherwise (a vmdk or a LUKS volume used as raw bytes is a mistake, not a disk).
    pub fn probe(file: &File) -> io::Result<Self> {
        // A whole aligned block: the file may have been opened with O_DIRECT.
        #[repr(align(4096))]
        struct Aligned([u8; 4096]);
        let mut block = Aligned([0; 4096]);
        let mut len = 0;
        while len < HEADER_PROBE_BYTES {
            match file.read_at(&mut block.0[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match header_name(&block.0[..len.min(HEADER_PROBE_BYTES)]) {
            None => Ok(ImageFormat::Raw),
            Some("qcow2") => Ok(ImageFormat::Qcow2),
            Some(other) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "it is a {other} image, which is not supported (give format=raw to use its bytes as the disk)"
                ),
            )),
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of the format whose header `head` (an image's first bytes) starts with, if any.
fn header_name(head: &[u8]) -> Option<&'static str> {
    KNOWN_HEADERS
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
        .map(|&(_, name)| name)
}

/// Whether data written at offset 0 of a disk, starting with `head` (at most
/// 64 bytes of it), is the header of an image format QEMU would probe: what a
/// guest may not write to a disk whose raw format was probed.
pub fn is_format_header(head: &[u8]) -> bool {
    header_name(head).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn probe(content: &[u8]) -> io::Result<ImageFormat> {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all_at(content, 0).unwrap();
        ImageFormat::probe(tmp.as_file())
    }

    #[test]
    fn probes_qcow2_raw_and_refuses_other_formats() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03").unwrap(), ImageFormat::Qcow2);
        assert_eq!(probe(&[0u8; 4096]).unwrap(), ImageFormat::Raw);
        assert_eq!(probe(b"").unwrap(), ImageFormat::Raw, "an empty file");
        assert_eq!(
            probe(b"QF").unwrap(),
            ImageFormat::Raw,
            "shorter than a magic"
        );
        let e = probe(b"KDMV\x01\0\0\0").unwrap_err();
        assert!(e.to_string().contains("vmdk"), "{e}");
        assert!(probe(b"LUKS\xba\xbe\0\x01").is_err());
        assert!(probe(b"QFI\0\0\0\0\x01").is_err(), "qcow version 1");
    }

    #[test]
    fn headers_a_probed_raw_disk_refuses() {
        assert!(is_format_header(b"QFI\xfb\0\0\0\x03"));
        assert!(is_format_header(b"conectix\0\0"));
        assert!(!is_format_header(&[0u8; 64]));
        assert!(!is_format_header(b"\xebc\x90"), "an MBR boot sector");
        assert!(!is_format_header(b""));
    }

    #[test]
    fn probes_through_o_direct() {
        use std::os::unix::fs::OpenOptionsExt;
        // /var/tmp, not /tmp: tmpfs refuses O_DIRECT.
        let path = std::env::temp_dir().join(format!("probe-direct-{}", std::process::id()));
        let path = if path.starts_with("/tmp") {
            std::path::PathBuf::from("/var/tmp").join(path.file_name().unwrap())
        } else {
            path
        };
        let mut content = vec![0u8; 8192];
        content[..4].copy_from_slice(&QCOW2_MAGIC);
        std::fs::write(&path, &content).unwrap();
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let _ = std::fs::remove_file(&path);
        match opened {
            Ok(file) => assert_eq!(ImageFormat::probe(&file).unwrap(), ImageFormat::Qcow2),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
        }
    }

    #[test]
    fn names() {
        for f in [ImageFormat::Raw, ImageFormat::Qcow2] {
            assert_eq!(ImageFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(ImageFormat::from_name("vmdk"), None);
        assert_eq!(ImageFormat::default(), ImageFormat::Raw);
    }
}
