//! The device on qcow2 images made by `qemu-img` (with and without a backing file), and the
//! guard on probed raw images: the data the guest reads and writes, what `qemu-img` finds in
//! the image afterwards (`check` clean, `convert` to raw), and what is refused.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::tempdir::TempDir;

use super::depth_tests::{
    data, expected, guest_data, publish, publish_reads_and_writes, status, QUEUE, S_IOERR, S_OK,
};
use super::testing::*;
use super::{AioBackend, Block, BlockConfig, Disk, ImageFormat, RequestProcessor};
use crate::virtio::GuestRam;

/// Runs `qemu-img` (the qemu-utils package) and returns its stdout; fails the test with its
/// output when it fails.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img (package qemu-utils) cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` finds nothing wrong with `image`.
fn assert_clean(image: &Path) {
    let out = qemu_img(&["check", s(image)]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// The virtual disk of `image`, converted to raw by QEMU.
fn as_raw(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("converted");
    qemu_img(&["convert", "-O", "raw", s(image), s(&raw)]);
    std::fs::read(raw).unwrap()
}

/// A raw base image of `sectors` sectors of [`pattern`], and a qcow2 image over it.
fn qcow2_over_raw(dir: &TempDir, sectors: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.as_path().join("base.raw");
    let bytes: Vec<u8> = (0..sectors * 512).map(pattern).collect();
    std::fs::write(&base, &bytes).unwrap();
    let top = dir.as_path().join("top.qcow2");
    // The backing file's name is relative: found from the image's own directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    (base, top)
}

#[test]
fn qcow2_over_a_backing_file_serves_requests_at_depth_32() {
    let dir = TempDir::new().unwrap();
    let (base, top) = qcow2_over_raw(&dir, IMAGE_SECTORS);
    let before = std::fs::read(&base).unwrap();
    for aio in [AioBackend::Auto, AioBackend::Threads] {
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let q = MockSplitQueue::new(mem, QUEUE);
        let mut config = BlockConfig::new(&top, "disk0");
        config.aio = aio;
        let mut dev = Block::new(config).unwrap();
        assert_eq!(dev.format(), ImageFormat::Qcow2, "probed");
        assert!(dev.format_probed());
        assert_eq!(dev.capacity(), IMAGE_SECTORS, "the backing file's size");
        publish_reads_and_writes(mem, &q);
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        wait_for("32 completions", || q.used().idx().load() == 32);
        for i in (0..32u16).step_by(2) {
            assert_eq!(status(mem, i), S_OK, "{aio:?} read {i}");
            assert_eq!(guest_data(mem, i), expected(u64::from(i)), "{aio:?} {i}");
        }
        drop(dev);
        let disk = as_raw(&top);
        for i in (1..32u16).step_by(2) {
            let at = (32 + usize::from(i)) * 512;
            assert_eq!(disk[at..at + 512], [i as u8; 512], "{aio:?} write {i}");
        }
        assert_eq!(
            std::fs::read(&base).unwrap(),
            before,
            "the backing file untouched"
        );
        assert_clean(&top);
    }
}

const HDR: u64 = 0x1_0000;
const RANGES: u64 = 0x1_1000;
const STATUS: u64 = 0x1_2000;
const DATA: u64 = 0x2_0000;

fn read_status(mem: &GuestRam) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// `p` writes `len` bytes of `byte` at `sector`; returns the status.
fn write(p: &mut RequestProcessor, mem: &GuestRam, sector: u64, len: u32, byte: u8) -> u8 {
    put_header(mem, HDR, VIRTIO_BLK_T_OUT, sector);
    mem.write_slice(&vec![byte; len as usize], GuestAddress(DATA))
        .unwrap();
    with_chain(
        mem,
        &[desc(HDR, 16, 0), desc(DATA, len, 0), desc(STATUS, 1, W)],
        |c| p.process(c),
    );
    read_status(mem)
}

/// `p` reads `len` bytes at `sector`; returns them.
fn read(p: &mut RequestProcessor, mem: &GuestRam, sector: u64, len: u32) -> Vec<u8> {
    put_header(mem, HDR, VIRTIO_BLK_T_IN, sector);
    with_chain(
        mem,
        &[desc(HDR, 16, 0), desc(DATA, len, W), desc(STATUS, 1, W)],
        |c| p.process(c),
    );
    assert_eq!(read_status(mem), S_OK);
    let mut v = vec![0u8; len as usize];
    mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
    v
}

/// One discard or write-zeroes segment.
fn zero(
    p: &mut RequestProcessor,
    mem: &GuestRam,
    ty: u32,
    sector: u64,
    sectors: u32,
    flags: u32,
) -> u8 {
    put_header(mem, HDR, ty, 0);
    put_range(mem, RANGES, sector, sectors, flags);
    with_chain(
        mem,
        &[desc(HDR, 16, 0), desc(RANGES, 16, 0), desc(STATUS, 1, W)],
        |c| p.process(c),
    );
    read_status(mem)
}

fn processor_on(disk: Disk) -> RequestProcessor {
    RequestProcessor::new(Arc::new(disk), "q", u64::MAX, 8, Arc::default())
}

#[test]
fn qcow2_write_zeroes_and_discard_leave_zeros_and_a_clean_image() {
    let dir = TempDir::new().unwrap();
    let img = dir.as_path().join("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "1M",
    ]);
    let disk = Disk::open_format(&img, false, Some(ImageFormat::Qcow2)).unwrap();
    assert_eq!(disk.capacity(), 2048);
    let mem = guest_memory();
    let mut p = processor_on(disk);
    // 64 KiB of data from sector 0: sixteen clusters allocated.
    assert_eq!(write(&mut p, &mem, 0, 65536, 0xab), S_OK);
    // Zero clusters 2-3 (sectors 16..32), freeing them; zero 512 bytes inside cluster 5
    // (written as zeros); discard clusters 8-9.
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(
        zero(&mut p, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 16, 16, unmap),
        S_OK
    );
    assert_eq!(
        zero(&mut p, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 41, 1, 0),
        S_OK
    );
    assert_eq!(zero(&mut p, &mem, VIRTIO_BLK_T_DISCARD, 64, 16, 0), S_OK);
    let back = read(&mut p, &mem, 0, 65536);
    assert!(back[..16 * 512].iter().all(|&b| b == 0xab));
    assert!(
        back[16 * 512..32 * 512].iter().all(|&b| b == 0),
        "write zeroes, unmap"
    );
    assert!(
        back[41 * 512..42 * 512].iter().all(|&b| b == 0),
        "write zeroes in a cluster"
    );
    assert!(back[40 * 512..41 * 512].iter().all(|&b| b == 0xab));
    assert!(back[80 * 512..].iter().all(|&b| b == 0xab));
    // Flush through the request path writes the metadata back; drop closes.
    put_header(
        &mem,
        HDR,
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH,
        0,
    );
    with_chain(&mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], |c| {
        p.process(c)
    });
    assert_eq!(read_status(&mem), S_OK);
    drop(p);
    assert_clean(&img);
    let raw = as_raw(&img);
    assert_eq!(raw[..65536], back[..], "QEMU reads what the guest read");
    let map = qemu_img(&["map", "--output=json", s(&img)]);
    assert!(map.contains("\"start\": 8192, \"length\": 8192, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{map}");
}

#[test]
fn readonly_qcow2_reads_and_refuses_writes() {
    let dir = TempDir::new().unwrap();
    let (_base, top) = qcow2_over_raw(&dir, IMAGE_SECTORS);
    let before = std::fs::read(&top).unwrap();
    let disk = Disk::open_format(&top, true, None).unwrap();
    assert_eq!(disk.format(), ImageFormat::Qcow2);
    let mem = guest_memory();
    let mut p = processor_on(disk);
    assert_eq!(read(&mut p, &mem, 3, 1024), expected_range(3 * 512, 1024));
    assert_eq!(write(&mut p, &mem, 3, 512, 1), S_IOERR);
    assert_eq!(
        zero(&mut p, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 3, 1, 0),
        S_IOERR
    );
    drop(p);
    assert_eq!(std::fs::read(&top).unwrap(), before, "not a byte changed");
}

fn expected_range(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(pattern).collect()
}

#[test]
fn images_that_are_not_what_they_are_said_to_be_are_refused_at_open() {
    let dir = TempDir::new().unwrap();
    let raw = dir.as_path().join("d.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    let e = Disk::open_format(&raw, false, Some(ImageFormat::Qcow2)).unwrap_err();
    assert!(!e.to_string().is_empty());
    // A qcow2 header followed by garbage.
    let bad = dir.as_path().join("bad.qcow2");
    let mut bytes = vec![0xffu8; 4096];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(Disk::open_format(&bad, false, None).is_err());
    let e = Block::new(BlockConfig::new(&bad, "d")).err().unwrap();
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    // A vmdk is not opened as raw bytes unless the user says raw.
    let vmdk = dir.as_path().join("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&vmdk), "1M"]);
    let e = Disk::open_format(&vmdk, false, None).unwrap_err();
    assert!(e.to_string().contains("vmdk"), "{e}");
    assert!(Disk::open_format(&vmdk, false, Some(ImageFormat::Raw)).is_ok());
}

/// A qcow2 image's backing file is opened as the image itself is: one that is a FIFO or a
/// directory is refused, naming the file and what it is, and the open never blocks; one that
/// is an image opens read-only.
#[test]
fn a_backing_file_that_is_no_image_is_refused_without_blocking() {
    let dir = TempDir::new().unwrap();
    let (base, top) = qcow2_over_raw(&dir, 8);
    let opened = Disk::open_format(&top, false, None).unwrap();
    assert_eq!(opened.capacity(), 8);
    drop(opened);
    let open_within_10s = || {
        let (tx, rx) = std::sync::mpsc::channel();
        let top = top.clone();
        std::thread::spawn(move || tx.send(Disk::open_format(&top, false, None).map(|_| ())));
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening the image blocked")
    };
    std::fs::remove_file(&base).unwrap();
    let c = std::ffi::CString::new(base.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = open_within_10s().unwrap_err().to_string();
    assert!(e.contains("it is a FIFO") && e.contains("base.raw"), "{e}");
    std::fs::remove_file(&base).unwrap();
    std::fs::create_dir(&base).unwrap();
    let e = open_within_10s().unwrap_err().to_string();
    assert!(e.contains("directory") && e.contains("base.raw"), "{e}");
}

#[test]
fn a_probed_raw_disk_refuses_an_image_header_in_sector_0() {
    let tmp = image();
    let mem = guest_memory();
    let header_write = |p: &mut RequestProcessor, sector: u64| {
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, sector);
        let mut sector0 = vec![0u8; 512];
        sector0[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        mem.write_slice(&sector0, GuestAddress(DATA)).unwrap();
        // Header split from the data, data split after 2 bytes: the check reads across.
        with_chain(
            &mem,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 2, 0),
                desc(DATA + 2, 510, 0),
                desc(STATUS, 1, W),
            ],
            |c| p.process(c),
        );
        read_status(&mem)
    };
    let probed = Disk::open_format(tmp.as_path(), false, None).unwrap();
    assert!(probed.probed_raw());
    let mut p = processor_on(probed);
    assert_eq!(header_write(&mut p, 0), S_IOERR);
    assert_eq!(
        image_bytes(&tmp, 0, 4),
        expected_range(0, 4),
        "sector 0 unchanged"
    );
    assert_eq!(header_write(&mut p, 1), S_OK, "elsewhere it is data");
    assert_eq!(
        write(&mut p, &mem, 0, 512, 0),
        S_OK,
        "other data in sector 0"
    );
    drop(p);
    assert_eq!(ImageFormat::probe(tmp.as_file()).unwrap(), ImageFormat::Raw);
    // The user said raw: the bytes are the guest's.
    let mut p =
        processor_on(Disk::open_format(tmp.as_path(), false, Some(ImageFormat::Raw)).unwrap());
    assert_eq!(header_write(&mut p, 0), S_OK);
    assert_eq!(image_bytes(&tmp, 0, 4), b"QFI\xfb");
}

/// A paused device's qcow2 image is whole on disk — tables included — while the device lives:
/// what a snapshot or a migration's destination opens next.
#[test]
fn pausing_writes_a_qcow2_images_tables_back() {
    use crate::virtio::VirtioDevice;
    let dir = TempDir::new().unwrap();
    let img = dir.as_path().join("p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let rig = Rig::new();
    let guard = rig.memory.memory();
    let mem: &GuestRam = &guard;
    let q = MockSplitQueue::new(mem, QUEUE);
    let mut dev = Block::new(BlockConfig::new(&img, "disk0")).unwrap();
    for i in 0..8u16 {
        mem.write_slice(&[0x70 + i as u8; 512], GuestAddress(data(i)))
            .unwrap();
        // Sectors 256 apart: eight clusters allocated.
        publish(mem, &q, i, VIRTIO_BLK_T_OUT, 256 * u64::from(i));
    }
    rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
    wait_for("8 completions", || q.used().idx().load() == 8);
    dev.pause();
    assert_clean(&img);
    let disk = as_raw(&img);
    for i in 0..8usize {
        let at = i * 256 * 512;
        assert_eq!(disk[at..at + 512], [0x70 + i as u8; 512], "write {i}");
    }
    drop(dev);
}

/// A qcow2 image of `mib` MiB of [`pattern`] bytes, every cluster allocated in order (as
/// `qemu-img convert` lays them out), and the raw bytes it was made from.
fn allocated_qcow2(dir: &TempDir, mib: usize) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.as_path().join("src.raw");
    let bytes: Vec<u8> = (0..(mib << 20) as u64).map(|i| pattern(i / 7)).collect();
    std::fs::write(&raw, &bytes).unwrap();
    let img = dir.as_path().join("all.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2", s(&raw), s(&img)]);
    (img, bytes)
}

/// [`allocated_qcow2`] of `mib` MiB, opened as a disk: (its directory, its path, its bytes,
/// the disk).
fn open_allocated(mib: usize) -> (TempDir, std::path::PathBuf, Vec<u8>, Disk) {
    let dir = TempDir::new().unwrap();
    let (img, bytes) = allocated_qcow2(&dir, mib);
    let disk = Disk::open_format(&img, false, Some(ImageFormat::Qcow2)).unwrap();
    (dir, img, bytes, disk)
}

/// Runs `op` on `image` the way a pool thread does.
fn run_on(image: &super::qcow2::Qcow2Image, buf: &mut [u8], offset: u64, write: bool) {
    let mut iov = [super::host_io::IoVec::new(buf.as_mut_ptr(), buf.len())];
    let (iov, iovcnt) = (iov.as_mut_ptr(), 1);
    let op = if write {
        super::host_io::HostOp::Write {
            fd: -1,
            offset,
            iov,
            iovcnt,
        }
    } else {
        super::host_io::HostOp::Read {
            fd: -1,
            offset,
            iov,
            iovcnt,
        }
    };
    // SAFETY: `buf` outlives the call and is ours alone.
    assert_eq!(unsafe { image.run(op) }, Ok(buf.len()));
}

/// The bytes at `host` in the image file.
fn file_bytes(img: &Path, host: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut out, host)
        .unwrap();
    out
}

#[test]
fn the_direct_map_learns_allocated_clusters_and_forgets_them_at_a_discard() {
    let (_dir, img, bytes, disk) = open_allocated(4);
    let image = disk.qcow2().unwrap();
    assert_eq!(
        image.begin_direct(0, 4096, false),
        None,
        "nothing learnt yet"
    );
    let mut buf = vec![0u8; 4096];
    run_on(image, &mut buf, 0, false);
    assert_eq!(buf, bytes[..4096]);
    // One request through the format layer taught the map the whole 4 MiB (16 MiB ahead).
    for (offset, len) in [
        (3 * 65536 + 512, 4096),
        (65536 - 512, 1024),
        (2 << 20, 8192),
    ] {
        let (offset, len) = (offset as u64, len as u64);
        if offset + len > bytes.len() as u64 {
            continue;
        }
        let host = image
            .begin_direct(offset, len, true)
            .unwrap_or_else(|| panic!("{offset:#x}+{len} mapped"));
        assert_eq!(
            file_bytes(&img, host, len as usize),
            bytes[offset as usize..(offset + len) as usize],
            "{offset:#x}: the image file holds the disk's bytes where the map says"
        );
        image.end_direct(1);
    }
    assert_eq!(
        image.begin_direct(bytes.len() as u64 - 512, 1024, false),
        None,
        "past the end"
    );
    assert_eq!(image.begin_direct(0, 64 << 20, false), None, "too long");
    assert_eq!(image.direct_in_flight(), 0);
    // A discard empties the map: mappings may have changed.
    image.discard(8 * 65536, 65536).unwrap();
    assert_eq!(image.begin_direct(0, 4096, false), None);
    run_on(image, &mut buf, 0, false);
    assert_eq!(image.begin_direct(8 * 65536, 512, false), None, "discarded");
    assert!(image.begin_direct(9 * 65536, 512, false).is_some());
    image.end_direct(1);
}

#[test]
fn a_discard_waits_for_the_direct_requests_in_the_host() {
    let (_dir, img, _, disk) = open_allocated(1);
    let image = disk.qcow2().unwrap().clone();
    let mut buf = vec![0u8; 512];
    run_on(&image, &mut buf, 0, false);
    let host = image.begin_direct(65536, 4096, true);
    assert!(host.is_some());
    let discarding = {
        let image = image.clone();
        std::thread::spawn(move || image.discard(65536, 65536))
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !discarding.is_finished(),
        "the discard went ahead under a direct write to its cluster"
    );
    assert_eq!(
        image.begin_direct(2 * 65536, 512, false),
        None,
        "no new direct request while a discard waits"
    );
    image.end_direct(1);
    discarding.join().unwrap().unwrap();
    drop(disk);
    assert_clean(&img);
}

#[test]
fn only_the_images_own_clusters_go_direct() {
    let dir = TempDir::new().unwrap();
    // 1 MiB of backing data under a qcow2 image.
    let (_, top) = qcow2_over_raw(&dir, 2048);
    let disk = Disk::open_format(&top, false, Some(ImageFormat::Qcow2)).unwrap();
    let image = disk.qcow2().unwrap();
    let mut data = vec![2u8; 65536];
    run_on(image, &mut data, 65536, true);
    // A read through the pool from the start: the map learns what lies ahead of it.
    run_on(image, &mut data, 0, false);
    assert!(image.begin_direct(65536, 4096, true).is_some(), "written");
    image.end_direct(1);
    assert_eq!(
        image.begin_direct(0, 512, false),
        None,
        "in the backing file"
    );
    assert_eq!(image.begin_direct(131072, 512, false), None);
}

#[test]
fn the_qcow2_engine_sends_mapped_clusters_to_io_uring_and_the_rest_to_the_pool() {
    use super::host_io::{HostOp, IoEngine, IoVec};
    use std::os::unix::io::AsRawFd;
    let (_dir, img, bytes, disk) = open_allocated(2);
    let image = disk.qcow2().unwrap().clone();
    let Ok(mut engine) =
        super::qcow2_engine::Qcow2Engine::new(32, image.clone(), disk.as_raw_fd(), false)
    else {
        eprintln!("io_uring unavailable here: skipped");
        return;
    };
    let mut bufs = vec![vec![0u8; 4096]; 32];
    let mut iovs: Vec<[IoVec; 1]> = bufs
        .iter_mut()
        .map(|b| [IoVec::new(b.as_mut_ptr(), b.len())])
        .collect();
    let offset = |i: usize| ((i as u64 * 61_440) % (bytes.len() as u64 - 4096)) & !511;
    for round in 0..2 {
        for (i, iov) in iovs.iter_mut().enumerate() {
            // Odd requests write back what the even ones of the round before read.
            let op = HostOp::Read {
                fd: -1,
                offset: offset(i),
                iov: iov.as_mut_ptr(),
                iovcnt: 1,
            };
            // SAFETY: the buffers outlive the engine's completions, reaped below.
            unsafe { engine.push(i as u16, op).unwrap() };
        }
        engine.submit().unwrap();
        let done = reap_all(&mut engine, 32);
        assert!(done.iter().all(|(_, r)| *r == Ok(4096)), "{done:?}");
        for (i, b) in bufs.iter().enumerate() {
            let at = offset(i) as usize;
            assert_eq!(b[..], bytes[at..at + 4096], "round {round} request {i}");
        }
        let (direct, pool) = engine.counts();
        match round {
            // Nothing was mapped when the first 32 were pushed: all went to the pool.
            0 => assert_eq!((direct, pool), (0, 32)),
            // The pool's requests taught the map: all of the second round went direct.
            _ => assert_eq!((direct, pool), (32, 32)),
        }
    }
    // A write to a mapped cluster goes direct too, and lands where QEMU reads it.
    let mut data = vec![0xeeu8; 4096];
    let mut iov = [IoVec::new(data.as_mut_ptr(), data.len())];
    let op = HostOp::Write {
        fd: -1,
        offset: 8192,
        iov: iov.as_mut_ptr(),
        iovcnt: 1,
    };
    // SAFETY: as above.
    unsafe { engine.push(0, op).unwrap() };
    engine.submit().unwrap();
    assert_eq!(reap_all(&mut engine, 1), [(0, Ok(4096))]);
    assert_eq!(engine.counts(), (33, 32));
    assert_eq!(image.direct_in_flight(), 0, "every direct request ended");
    drop(engine);
    drop(disk);
    assert_clean(&img);
    assert_eq!(as_raw(&img)[8192..12288], data[..]);
}

/// Reaps `engine` until `n` completions came (10 s at most).
fn reap_all(
    engine: &mut dyn super::host_io::IoEngine,
    n: usize,
) -> Vec<(u16, super::host_io::HostResult)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < n {
        assert!(std::time::Instant::now() < deadline, "{n} completions");
        engine.reap(&mut done);
        std::thread::yield_now();
    }
    done
}
