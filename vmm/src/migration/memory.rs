//! Guest memory into and out of a stream: runs of non-zero pages (zero pages are skipped, the
//! destination's fresh memory is zero already), or an image in a file that the destination
//! maps instead of copying.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use devices::virtio::GuestRam;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use super::stream::{RecordHeader, StreamError, StreamReader, StreamWriter, PAGE_SIZE};

/// The most pages one `MEMR` record holds (4 MiB): a run longer than this is split.
const MAX_RUN_PAGES: usize = 1024;

/// What a pass over guest memory sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Pages sent with their contents.
    pub normal: u64,
    /// Zero pages (skipped on a first pass, sent as zero runs on later ones).
    pub zero: u64,
}

/// Whether `page` is all zero. Written to let the compiler use wide loads.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Every RAM region of `memory`: its guest address and its host bytes.
///
/// # Safety
///
/// Nothing may write guest memory while the slices live: the vCPUs are parked and the devices
/// paused, and the caller holds them so.
pub unsafe fn paused_regions(memory: &GuestRam) -> Vec<(u64, &[u8])> {
    memory
        .iter()
        .filter_map(|region| {
            let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
            // SAFETY: the region maps `len` bytes at `host` for as long as `memory` lives;
            // the caller guarantees nothing writes them meanwhile (see above).
            let bytes =
                unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
            Some((region.start_addr().0, bytes))
        })
        .collect()
}

/// The runs of non-zero pages of `bytes` (at guest address `base`), as (address, length in
/// bytes), at most [`MAX_RUN_PAGES`] long; also counts the zero pages.
pub fn nonzero_runs(base: u64, bytes: &[u8], stats: &mut PassStats) -> Vec<(u64, usize)> {
    let page = PAGE_SIZE as usize;
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for (i, p) in bytes.chunks(page).enumerate() {
        if is_zero(p) {
            stats.zero += 1;
            continue;
        }
        stats.normal += 1;
        let at = base + (i * page) as u64;
        match runs.last_mut() {
            Some((start, len)) if *start + *len as u64 == at && *len < MAX_RUN_PAGES * page => {
                *len += page;
            }
            _ => runs.push((at, page)),
        }
    }
    runs
}

/// Sends every non-zero page of a paused machine's memory as `MEMR` records.
///
/// # Safety
///
/// As [`paused_regions`]: nothing may write guest memory meanwhile.
pub unsafe fn send_paused<W: Write>(
    memory: &GuestRam,
    out: &mut StreamWriter<W>,
) -> std::io::Result<PassStats> {
    let mut stats = PassStats::default();
    // SAFETY: the caller guarantees nothing writes guest memory.
    for (base, bytes) in unsafe { paused_regions(memory) } {
        for (gpa, len) in nonzero_runs(base, bytes, &mut stats) {
            let off = (gpa - base) as usize;
            out.data_run(gpa, &bytes[off..off + len])?;
        }
    }
    Ok(stats)
}

/// Sends pages of guest memory while the guest runs: every page (`dirty` is `None`, the first
/// pass: zero pages are skipped, the destination's memory is zero already), or the pages
/// `dirty` marks (one bitmap per region: zero pages are sent as zero runs, they may have been
/// something else before). Each run is copied out of guest memory before it is looked at, so
/// a page the guest writes meanwhile is sent whole, old or new; it is dirty again for the next
/// pass.
pub fn send_running<W: Write>(
    memory: &GuestRam,
    dirty: Option<&[Vec<u64>]>,
    out: &mut StreamWriter<W>,
) -> std::io::Result<PassStats> {
    let page = PAGE_SIZE as usize;
    let mut stats = PassStats::default();
    let mut buf = vec![0u8; MAX_RUN_PAGES * page];
    for (index, region) in memory.iter().enumerate() {
        let base = region.start_addr().0;
        let pages = (region.len() / PAGE_SIZE) as usize;
        let marked = |n: usize| match dirty {
            None => true,
            Some(bits) => bits
                .get(index)
                .and_then(|b| b.get(n / 64))
                .is_some_and(|w| w & (1 << (n % 64)) != 0),
        };
        let mut n = 0;
        while n < pages {
            if !marked(n) {
                n += 1;
                continue;
            }
            let start = n;
            while n < pages && n - start < MAX_RUN_PAGES && marked(n) {
                n += 1;
            }
            let bytes = &mut buf[..(n - start) * page];
            let gpa = base + (start * page) as u64;
            memory
                .read_slice(bytes, GuestAddress(gpa))
                .map_err(std::io::Error::other)?;
            // Split the copied run into runs of non-zero and zero pages.
            let mut i = 0;
            let count = n - start;
            while i < count {
                let zero = is_zero(&bytes[i * page..(i + 1) * page]);
                let mut j = i + 1;
                while j < count && is_zero(&bytes[j * page..(j + 1) * page]) == zero {
                    j += 1;
                }
                let at = gpa + (i * page) as u64;
                if zero {
                    stats.zero += (j - i) as u64;
                    if dirty.is_some() {
                        out.zero_run(at, (j - i) as u32)?;
                    }
                } else {
                    stats.normal += (j - i) as u64;
                    out.data_run(at, &bytes[i * page..j * page])?;
                }
                i = j;
            }
        }
    }
    Ok(stats)
}

/// Reads a `MEMR` record's pages into guest memory (a zero run writes zeros: on a first pass
/// the pages are zero already, on a later one they became zero).
pub fn receive_run<R: Read>(
    memory: &GuestRam,
    input: &mut StreamReader<R>,
    record: &RecordHeader,
) -> Result<PassStats, StreamError> {
    let (run, crc) = input.run(record)?;
    let len = run.bytes();
    let outside = || {
        StreamError::Malformed(format!(
            "memory run at {:#x} (+{len:#x}) is outside guest RAM",
            run.gpa
        ))
    };
    let region = memory
        .find_region(GuestAddress(run.gpa))
        .ok_or_else(outside)?;
    let offset = run.gpa - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(outside());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())?;
    // SAFETY: `host .. host + len` lies inside the region's mapping (checked above), which
    // lives as long as `memory`; the destination's vCPUs have not run yet and its devices are
    // not started, so nothing else accesses these bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
    if run.zero {
        bytes.fill(0);
        Ok(PassStats {
            normal: 0,
            zero: u64::from(run.pages),
        })
    } else {
        input.run_data(record, crc, bytes)?;
        Ok(PassStats {
            normal: u64::from(run.pages),
            zero: 0,
        })
    }
}

/// Where guest memory lies in a snapshot file (the `IMAG` record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLayout {
    /// Each RAM region: guest address, size, offset in the file (page-aligned).
    pub regions: Vec<(u64, u64, u64)>,
    /// The runs of non-zero pages, (guest address, bytes), in file order.
    pub runs: Vec<(u64, u64)>,
    /// CRC-32 of the runs' bytes, one after the other.
    pub crc: u32,
}

/// Writes a paused machine's memory as an image into `file` from `data_offset` on
/// (page-aligned): each region at its own offset, zero pages left as holes.
///
/// # Safety
///
/// As [`paused_regions`]: nothing may write guest memory meanwhile.
pub unsafe fn write_image(
    memory: &GuestRam,
    file: &File,
    data_offset: u64,
) -> std::io::Result<(ImageLayout, PassStats)> {
    let mut stats = PassStats::default();
    let mut layout = ImageLayout {
        regions: Vec::new(),
        runs: Vec::new(),
        crc: 0,
    };
    let mut crc = crc32fast::Hasher::new();
    let mut offset = data_offset;
    // SAFETY: the caller guarantees nothing writes guest memory.
    for (base, bytes) in unsafe { paused_regions(memory) } {
        layout.regions.push((base, bytes.len() as u64, offset));
        for (gpa, len) in nonzero_runs(base, bytes, &mut stats) {
            let at = (gpa - base) as usize;
            let data = &bytes[at..at + len];
            file.write_all_at(data, offset + at as u64)?;
            crc.update(data);
            layout.runs.push((gpa, len as u64));
        }
        offset += bytes.len() as u64;
    }
    file.set_len(offset)?;
    layout.crc = crc.finalize();
    Ok((layout, stats))
}

/// Guest memory mapped from the image in `file` (private: the guest's writes stay in this
/// process), after checking that the regions are RAM's and the data's checksum.
pub fn map_image(
    file: &File,
    layout: &ImageLayout,
    ram: &[(u64, u64)],
) -> Result<GuestRam, StreamError> {
    let regions: Vec<(u64, u64)> = layout.regions.iter().map(|&(g, s, _)| (g, s)).collect();
    if regions != ram {
        return Err(StreamError::Malformed(
            "its memory image does not have this machine's RAM regions".into(),
        ));
    }
    let file_len = file.metadata()?.len();
    let mut mapped = Vec::new();
    for &(gpa, size, offset) in &layout.regions {
        if offset % PAGE_SIZE != 0 || offset.checked_add(size).is_none_or(|e| e > file_len) {
            return Err(StreamError::Truncated("its memory image".into()));
        }
        let region = MmapRegion::build(
            Some(FileOffset::new(file.try_clone()?, offset)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| StreamError::Malformed(format!("cannot map its memory image: {e}")))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| StreamError::Malformed("memory region out of range".into()))?,
        );
    }
    let memory = GuestRam::from_regions(mapped)
        .map_err(|e| StreamError::Malformed(format!("memory regions: {e}")))?;
    let mut crc = crc32fast::Hasher::new();
    for &(gpa, len) in &layout.runs {
        let bad = || StreamError::Malformed(format!("memory run at {gpa:#x} is outside RAM"));
        let region = memory.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|e| e > region.len()) {
            return Err(bad());
        }
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| bad())?;
        // SAFETY: inside the region's private mapping (checked above); nothing runs on this
        // memory yet.
        crc.update(unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) });
    }
    if crc.finalize() != layout.crc {
        return Err(StreamError::Checksum("memory image".into()));
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x4000),
        ])
        .unwrap()
    }

    fn dirty(m: &GuestRam) {
        m.write_slice(&[1, 2, 3], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[4; 5000], GuestAddress(0x3ffe)).unwrap();
        m.write_slice(&[9], GuestAddress(0x20_3fff)).unwrap();
    }

    fn same(a: &GuestRam, b: &GuestRam) {
        for (ra, rb) in a.iter().zip(b.iter()) {
            let mut x = vec![0u8; ra.len() as usize];
            let mut y = vec![0u8; rb.len() as usize];
            a.read_slice(&mut x, ra.start_addr()).unwrap();
            b.read_slice(&mut y, rb.start_addr()).unwrap();
            assert!(x == y, "region {:#x} differs", ra.start_addr().0);
        }
    }

    #[test]
    fn runs_of_nonzero_pages_round_trip() {
        let src = memory();
        dirty(&src);
        let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
        // SAFETY: nothing else touches this test memory.
        let stats = unsafe { send_paused(&src, &mut w) }.unwrap();
        assert_eq!(
            stats.normal, 5,
            "pages 1, 3, 4, 5 and the last one of region 2"
        );
        assert_eq!(stats.normal + stats.zero, (0x10_0000 + 0x4000) / 4096);
        let bytes = w.finish().unwrap();
        let dst = memory();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        let mut got = PassStats::default();
        while r.bytes_read() < bytes.len() as u64 {
            let rec = r.next_record().unwrap();
            got.normal += receive_run(&dst, &mut r, &rec).unwrap().normal;
        }
        assert_eq!(got.normal, 5);
        same(&src, &dst);
    }

    #[test]
    fn a_run_outside_ram_is_refused() {
        let dst = memory();
        for (gpa, len) in [(0xffff_f000u64, 4096usize), (0x10_0000 - 4096, 8192)] {
            let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
            w.data_run(gpa, &vec![1; len]).unwrap();
            let bytes = w.finish().unwrap();
            let mut r = StreamReader::new(&bytes[..]).unwrap();
            let rec = r.next_record().unwrap();
            let e = receive_run(&dst, &mut r, &rec).unwrap_err();
            assert!(e.to_string().contains("outside guest RAM"), "{e}");
        }
    }

    #[test]
    fn passes_over_running_memory_send_what_changed_zeroed_pages_included() {
        let src = memory();
        dirty(&src);
        let dst = memory();
        let apply = |bytes: Vec<u8>| {
            let mut r = StreamReader::new(&bytes[..]).unwrap();
            while r.bytes_read() < bytes.len() as u64 {
                let rec = r.next_record().unwrap();
                receive_run(&dst, &mut r, &rec).unwrap();
            }
        };
        let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
        let first = send_running(&src, None, &mut w).unwrap();
        assert_eq!(first.normal, 5);
        apply(w.finish().unwrap());
        same(&src, &dst);
        // Page 1 becomes zero, page 7 gets data, page 0x20_3 of region 2 changes.
        src.write_slice(&[0; 3], GuestAddress(0x1000)).unwrap();
        src.write_slice(&[5], GuestAddress(0x7000)).unwrap();
        src.write_slice(&[6], GuestAddress(0x20_3000)).unwrap();
        let bits = vec![vec![(1 << 1) | (1 << 7), 0, 0, 0], vec![1 << 3]];
        let mut w = StreamWriter::new(Vec::new(), 0).unwrap();
        let pass = send_running(&src, Some(&bits), &mut w).unwrap();
        assert_eq!((pass.normal, pass.zero), (2, 1));
        apply(w.finish().unwrap());
        same(&src, &dst);
    }

    #[test]
    fn an_image_maps_back_and_its_corruption_is_caught() {
        let src = memory();
        dirty(&src);
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let file = tmp.as_file();
        // SAFETY: nothing else touches this test memory.
        let (layout, stats) = unsafe { write_image(&src, file, 8192) }.unwrap();
        assert_eq!(stats.normal, 5);
        let ram = [(0, 0x10_0000), (0x20_0000, 0x4000)];
        let dst = map_image(file, &layout, &ram).unwrap();
        same(&src, &dst);
        // The guest's writes stay private.
        dst.write_slice(&[7], GuestAddress(0x1000)).unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, 8192 + 0x1000).unwrap();
        assert_eq!(b[0], 1);
        // A flipped byte in the data, another machine's RAM, a truncated file: refused.
        file.write_all_at(&[0xff], 8192 + 0x1001).unwrap();
        assert!(matches!(
            map_image(file, &layout, &ram),
            Err(StreamError::Checksum(_))
        ));
        assert!(map_image(file, &layout, &ram[..1]).is_err());
        file.set_len(8192 + 0x1000).unwrap();
        assert!(matches!(
            map_image(file, &layout, &ram),
            Err(StreamError::Truncated(_))
        ));
    }
}
