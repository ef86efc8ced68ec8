//! The snapshot and migration stream format (docs/snapshot-format.md): a header, then records,
//! each with a tag, a length and a CRC-32 of its contents, so that a truncated or corrupted
//! stream is refused before anything is restored from it.
//!
//! ```text
//! header   "HPVMSNAP"  u32 version  u32 flags                 (16 bytes, little-endian)
//! record   [u8; 4] tag  u64 length  u32 crc32  [length bytes]  (16-byte record header;
//!          the CRC-32 covers the tag, the length and the contents)
//! ```
//!
//! Records, in stream order: `CONF` (the machine, JSON), `MEMR` (guest memory, any number of
//! them, possibly several passes over the same pages during a live migration), `STAT` (the
//! vCPUs, the interrupt controllers, the devices and the hot-plug control plane, JSON), `DONE`.
//! A `MEMR` record is a run of whole pages: `u64 guest address, u32 page count, u32 kind`,
//! then the pages' bytes (kind 0), or nothing (kind 1: the pages are zero).
//!
//! A file written by `file:` has the flag [`FLAG_IMAGE`] and no `MEMR` records: an `IMAG`
//! record (JSON) says where guest memory lies further on in the file, as an image of each
//! RAM region with holes for its zero pages, so that the destination maps it rather than
//! copies it.

use std::io::{self, Read, Write};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"HPVMSNAP";
/// The format version this VMM writes and reads. Version 1 is the first.
pub const VERSION: u32 = 1;
/// Header flag: guest memory is an image in the file (an `IMAG` record), not `MEMR` records.
pub const FLAG_IMAGE: u32 = 1;
/// Size of the stream header.
pub const HEADER_LEN: usize = 16;
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Size of a `MEMR` record's run header.
pub const RUN_HEADER_LEN: usize = 16;
/// Guest memory moves in pages of this size.
pub const PAGE_SIZE: u64 = 4096;
/// The largest JSON record a reader accepts (a machine's state is a few hundred KiB).
pub const MAX_JSON_RECORD: u64 = 64 << 20;

/// Record tags.
pub mod tag {
    /// The machine (JSON): checked against the destination's before anything else.
    pub const CONF: [u8; 4] = *b"CONF";
    /// A run of guest memory pages.
    pub const MEMR: [u8; 4] = *b"MEMR";
    /// Where the memory image lies in a file (JSON).
    pub const IMAG: [u8; 4] = *b"IMAG";
    /// The vCPUs, devices and hot-plug state (JSON).
    pub const STAT: [u8; 4] = *b"STAT";
    /// The end of the stream.
    pub const DONE: [u8; 4] = *b"DONE";
}

/// `MEMR` kind: the run's bytes follow.
pub const RUN_DATA: u32 = 0;
/// `MEMR` kind: the run's pages are zero; no bytes follow.
pub const RUN_ZERO: u32 = 1;

/// Why a stream cannot be read. Each message is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Not a hotplug-vmm stream at all.
    #[error("not a hotplug-vmm snapshot or migration stream (no HPVMSNAP header)")]
    BadMagic,
    /// Written by another format version.
    #[error(
        "snapshot format version {0} is not supported (this hotplug-vmm reads version {VERSION})"
    )]
    Version(u32),
    /// The stream ended in the middle.
    #[error("the snapshot is truncated: it ends inside {0}")]
    Truncated(String),
    /// A record's contents do not match its checksum.
    #[error("the snapshot is corrupted: the checksum of its {0} record does not match")]
    Checksum(String),
    /// A record that cannot be where it is, or is malformed.
    #[error("the snapshot is malformed: {0}")]
    Malformed(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The checksum of a record starts with its tag and length, so that a damaged record header
/// is caught too.
fn record_crc(tag: [u8; 4], len: u64) -> crc32fast::Hasher {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&tag);
    crc.update(&len.to_le_bytes());
    crc
}

/// A record tag as text, for messages.
pub fn tag_name(tag: [u8; 4]) -> String {
    String::from_utf8_lossy(&tag).into_owned()
}

/// Reads exactly `buf.len()` bytes; the end of the stream is [`StreamError::Truncated`] naming
/// `what`.
fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Truncated(what.to_string()),
        _ => StreamError::Io(e),
    })
}

/// The header of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record is.
    pub tag: [u8; 4],
    /// How many bytes follow.
    pub len: u64,
    /// CRC-32 of those bytes.
    pub crc: u32,
}

/// A `MEMR` record's run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Pages in the run.
    pub pages: u32,
    /// Whether the pages are zero (no bytes follow).
    pub zero: bool,
}

impl Run {
    /// The run's size in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE
    }

    fn encode(&self) -> [u8; RUN_HEADER_LEN] {
        let mut b = [0u8; RUN_HEADER_LEN];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..12].copy_from_slice(&self.pages.to_le_bytes());
        b[12..16].copy_from_slice(&(if self.zero { RUN_ZERO } else { RUN_DATA }).to_le_bytes());
        b
    }

    fn decode(b: &[u8; RUN_HEADER_LEN]) -> Result<Self, StreamError> {
        let gpa = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
        let pages = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        let zero = match u32::from_le_bytes(b[12..16].try_into().unwrap_or_default()) {
            RUN_DATA => false,
            RUN_ZERO => true,
            k => {
                return Err(StreamError::Malformed(format!(
                    "memory run of unknown kind {k}"
                )))
            }
        };
        if gpa % PAGE_SIZE != 0 || pages == 0 {
            return Err(StreamError::Malformed(format!(
                "memory run of {pages} pages at {gpa:#x}"
            )));
        }
        Ok(Run { gpa, pages, zero })
    }
}

/// Writes a stream.
pub struct StreamWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header (`flags`: [`FLAG_IMAGE`] or 0) to `out`.
    pub fn new(mut out: W, flags: u32) -> io::Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        out.write_all(&h)?;
        Ok(StreamWriter {
            out,
            written: HEADER_LEN as u64,
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A record of `tag` holding `parts` one after the other.
    pub fn record(&mut self, tag: [u8; 4], parts: &[&[u8]]) -> io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut crc = record_crc(tag, len);
        for p in parts {
            crc.update(p);
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&tag);
        h[4..12].copy_from_slice(&len.to_le_bytes());
        h[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
        self.out.write_all(&h)?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.written += RECORD_HEADER_LEN as u64 + len;
        Ok(())
    }

    /// A `MEMR` record of the pages `data` at `gpa` (whole pages).
    pub fn data_run(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let run = Run {
            gpa,
            pages: (data.len() as u64 / PAGE_SIZE) as u32,
            zero: false,
        };
        self.record(tag::MEMR, &[&run.encode(), data])
    }

    /// A `MEMR` record saying `pages` pages at `gpa` are zero.
    pub fn zero_run(&mut self, gpa: u64, pages: u32) -> io::Result<()> {
        let run = Run {
            gpa,
            pages,
            zero: true,
        };
        self.record(tag::MEMR, &[&run.encode()])
    }

    /// Flushes and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }

    /// The output, to read what the other side says back.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Reads a stream, checking every record's checksum.
pub struct StreamReader<R: Read> {
    input: R,
    flags: u32,
    read: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let mut h = [0u8; HEADER_LEN];
        match input.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StreamError::BadMagic)
            }
            Err(e) => return Err(e.into()),
        }
        if h[0..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        let flags = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
        if flags & !FLAG_IMAGE != 0 {
            return Err(StreamError::Malformed(format!(
                "its header has unknown flags {flags:#x}"
            )));
        }
        Ok(StreamReader {
            input,
            flags,
            read: HEADER_LEN as u64,
        })
    }

    /// The header's flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// The next record's header.
    pub fn next_record(&mut self) -> Result<RecordHeader, StreamError> {
        let mut h = [0u8; RECORD_HEADER_LEN];
        read_exact(&mut self.input, &mut h, "a record header")?;
        self.read += RECORD_HEADER_LEN as u64;
        Ok(RecordHeader {
            tag: h[0..4].try_into().unwrap_or_default(),
            len: u64::from_le_bytes(h[4..12].try_into().unwrap_or_default()),
            crc: u32::from_le_bytes(h[12..16].try_into().unwrap_or_default()),
        })
    }

    /// The contents of `record`, a JSON record, checked.
    pub fn json_payload(&mut self, record: &RecordHeader) -> Result<Vec<u8>, StreamError> {
        let name = tag_name(record.tag);
        if record.len > MAX_JSON_RECORD {
            return Err(StreamError::Malformed(format!(
                "its {name} record claims {} bytes",
                record.len
            )));
        }
        // Grown as the bytes come, not allocated up front from a length that may lie.
        let mut buf = Vec::new();
        (&mut self.input).take(record.len).read_to_end(&mut buf)?;
        if buf.len() as u64 != record.len {
            return Err(StreamError::Truncated(format!("its {name} record")));
        }
        self.read += record.len;
        let mut crc = record_crc(record.tag, record.len);
        crc.update(&buf);
        if crc.finalize() != record.crc {
            return Err(StreamError::Checksum(name));
        }
        Ok(buf)
    }

    /// Checks the `DONE` record `record`: empty, its checksum right.
    pub fn end(&mut self, record: &RecordHeader) -> Result<(), StreamError> {
        if record.len != 0 {
            return Err(StreamError::Malformed(
                "its DONE record is not empty".into(),
            ));
        }
        self.json_payload(record).map(|_| ())
    }

    /// The run of a `MEMR` record; then [`run_data`](Self::run_data) reads its bytes (unless
    /// it is a zero run) and checks the record.
    pub fn run(&mut self, record: &RecordHeader) -> Result<(Run, crc32fast::Hasher), StreamError> {
        let mut b = [0u8; RUN_HEADER_LEN];
        if record.len < RUN_HEADER_LEN as u64 {
            return Err(StreamError::Malformed(
                "a memory record without its run".into(),
            ));
        }
        read_exact(&mut self.input, &mut b, "a memory record")?;
        self.read += RUN_HEADER_LEN as u64;
        let run = Run::decode(&b)?;
        let expect = RUN_HEADER_LEN as u64 + if run.zero { 0 } else { run.bytes() };
        if record.len != expect {
            return Err(StreamError::Malformed(format!(
                "a memory record of {} bytes for a run of {} pages",
                record.len, run.pages
            )));
        }
        let mut crc = record_crc(record.tag, record.len);
        crc.update(&b);
        if run.zero && crc.clone().finalize() != record.crc {
            return Err(StreamError::Checksum("MEMR".into()));
        }
        Ok((run, crc))
    }

    /// Reads a data run's bytes into `into` (exactly the run's size) and checks the record.
    pub fn run_data(
        &mut self,
        record: &RecordHeader,
        mut crc: crc32fast::Hasher,
        into: &mut [u8],
    ) -> Result<(), StreamError> {
        read_exact(&mut self.input, into, "a memory record")?;
        self.read += into.len() as u64;
        crc.update(into);
        if crc.finalize() != record.crc {
            return Err(StreamError::Checksum("MEMR".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
        w.record(tag::CONF, &[b"{\"a\":1}"]).unwrap();
        w.data_run(0x1000, &[7u8; 8192]).unwrap();
        w.zero_run(0x10_0000, 3).unwrap();
        w.record(tag::STAT, &[b"{}"]).unwrap();
        w.record(tag::DONE, &[]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(r.flags(), 0);
        let conf = r.next_record().unwrap();
        assert_eq!(conf.tag, tag::CONF);
        assert_eq!(r.json_payload(&conf).unwrap(), b"{\"a\":1}");
        let mem = r.next_record().unwrap();
        let (run, crc) = r.run(&mem).unwrap();
        assert_eq!(
            run,
            Run {
                gpa: 0x1000,
                pages: 2,
                zero: false
            }
        );
        let mut page = vec![0u8; 8192];
        r.run_data(&mem, crc, &mut page).unwrap();
        assert_eq!(page, vec![7u8; 8192]);
        let zero = r.next_record().unwrap();
        let (run, _) = r.run(&zero).unwrap();
        assert!(run.zero && run.pages == 3);
        let stat = r.next_record().unwrap();
        assert_eq!(r.json_payload(&stat).unwrap(), b"{}");
        assert_eq!(r.next_record().unwrap().tag, tag::DONE);
        assert_eq!(r.bytes_read(), bytes.len() as u64);
    }

    /// Reads the whole sample, as a restore would, returning the first error.
    fn read_all(bytes: &[u8]) -> Result<(), StreamError> {
        let mut r = StreamReader::new(bytes)?;
        loop {
            let rec = r.next_record()?;
            match rec.tag {
                tag::MEMR => {
                    let (run, crc) = r.run(&rec)?;
                    if !run.zero {
                        let mut buf = vec![0u8; run.bytes() as usize];
                        r.run_data(&rec, crc, &mut buf)?;
                    }
                }
                tag::DONE => return r.end(&rec),
                _ => {
                    r.json_payload(&rec)?;
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        assert!(read_all(&bytes).is_ok());
        for len in 0..bytes.len() {
            let e = read_all(&bytes[..len]).unwrap_err();
            assert!(
                matches!(e, StreamError::Truncated(_) | StreamError::BadMagic),
                "{len}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = sample();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(read_all(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn other_versions_and_other_files_are_refused() {
        let mut bytes = sample();
        bytes[8] = 0;
        let e = read_all(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot format version 0 is not supported (this hotplug-vmm reads version 1)"
        );
        assert!(matches!(
            read_all(b"\x7fELF...."),
            Err(StreamError::BadMagic)
        ));
        assert!(matches!(read_all(b""), Err(StreamError::BadMagic)));
    }

    #[test]
    fn malformed_runs_are_refused() {
        for (gpa, pages) in [(0x1001u64, 1u32), (0x1000, 0)] {
            let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
            let run = Run {
                gpa,
                pages,
                zero: true,
            };
            w.record(tag::MEMR, &[&run.encode()]).unwrap();
            let bytes = w.finish().unwrap();
            let e = read_all(&bytes).unwrap_err();
            assert!(matches!(e, StreamError::Malformed(_)), "{e}");
        }
        // A JSON record claiming more than any machine's state.
        let mut bytes = StreamWriter::new(Vec::new(), 0).unwrap().finish().unwrap();
        bytes.extend_from_slice(b"STAT");
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        assert!(matches!(read_all(&bytes), Err(StreamError::Malformed(_))));
    }
}
