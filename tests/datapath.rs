//! The asynchronous data path (issue 20) under a real guest driver at depth: 32 processes of
//! the guest read and write a hot-added raw disk at once (`O_DIRECT`), the host holding their
//! requests until all 32 are in the device, then letting them go at once. Sixteen copy a
//! region of the disk to another (a read then a write, each 16 KiB, four times), sixteen read
//! a third region each; afterwards every copy is on the host's image byte for byte and every
//! read matched the host's data. Restored guests, both kernels.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::fuse::FuseDisk;
use common::hotplug::*;
use common::qmp::QmpClient;
use common::{BootOptions, Guest, TempDir};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// Each job's region.
const REGION: u64 = 64 << 10;
const JOBS: u64 = 16;
/// Where the copies' sources, the copies and the reads' regions start.
const SOURCES: u64 = MIB;
const COPIES: u64 = 4 * MIB;
const READS: u64 = 2 * MIB;

/// An 8 MiB image of pseudo-random bytes, `node`'s signature first (what `hot_add` checks).
fn random_disk(dir: &TempDir, node: &str) -> std::path::PathBuf {
    let path = dir.path(&format!("{node}.img"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data: Vec<u8> = (0..8 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    data[..16].copy_from_slice(signature(node).as_bytes());
    std::fs::write(&path, data).unwrap();
    path
}

fn region(image: &Path, offset: u64) -> Vec<u8> {
    let data = std::fs::read(image).unwrap();
    data[offset as usize..(offset + REGION) as usize].to_vec()
}

/// md5 of a region of the host's image, as the guest's `md5sum` prints it.
fn host_md5(image: &Path, offset: u64) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if={} bs=64k skip={} count=1 2>/dev/null | md5sum",
            image.display(),
            offset / REGION
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn depth(version: &str) {
    let dir = TempDir::new(&format!("datapath-{version}"));
    let sock = dir.path("qmp.sock");
    let mut opts = BootOptions::shared(version);
    opts.extra_args
        .extend(["--qmp".to_string(), sock.display().to_string()]);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);
    let image = random_disk(&dir, "deep");
    // Served over FUSE, so that the host can hold the requests until all 32 are in the
    // device: on a PVM host the guest starts its processes far slower than the host serves a
    // request, and they would never all be in flight at once otherwise.
    let held = FuseDisk::serve(&dir, "deep", &image);
    blockdev_add(&mut q, "deep", &held.file());
    let dev = hot_add(&mut g, &mut q, "deep-d", "deep", "rp0");
    held.hold();
    // (Commands go through the serial console, a few hundred characters a second here: they
    // stay short.)
    let (s, c, r, n) = (
        SOURCES / (16 << 10),
        COPIES / (16 << 10),
        READS / (16 << 10),
        REGION / (16 << 10),
    );
    g.run(&format!(
        "rm -f /tmp/ends; i=0; while [ $i -lt {JOBS} ]; do \
         (dd if=/dev/{dev} of=/dev/{dev} bs=16k skip=$(({s}+{n}*i)) seek=$(({c}+{n}*i)) \
         count={n} iflag=direct oflag=direct 2>/dev/null; echo \"copy $i $?\" >> /tmp/ends) & \
         (dd if=/dev/{dev} bs=16k skip=$(({r}+{n}*i)) count={n} iflag=direct 2>/dev/null \
         | md5sum > /tmp/md5-$i; echo \"read $i $?\" >> /tmp/ends) & \
         i=$((i+1)); done"
    ));
    // Every job's first read is in the device, held on the host: depth 32.
    wait_in_flight(&mut g, &dev, Direction::Read, 2 * JOBS as usize);
    held.release_after(Duration::ZERO).join().unwrap();
    wait_lines(&mut g, "/tmp/ends", 2 * JOBS as usize);
    let ends = g.run("cat /tmp/ends");
    assert_eq!(
        ends.lines().filter(|l| l.ends_with(" 0")).count(),
        2 * JOBS as usize,
        "every job succeeded: {ends}"
    );
    for i in 0..JOBS {
        let md5 = g.run(&format!("cat /tmp/md5-{i}"));
        let md5 = md5
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        assert_eq!(md5, host_md5(&image, READS + i * REGION), "read {i}");
        assert_eq!(
            region(&image, COPIES + i * REGION),
            region(&image, SOURCES + i * REGION),
            "copy {i} is on the host's image"
        );
    }
    q.ok("device_del", json!({"id": "deep-d"}));
    wait_deleted(&g, &mut q, "deep-d");
    assert_eq!(g.run("echo alive"), "alive");
}

#[test]
fn depth_linux_6_1() {
    depth("6.1");
}

#[test]
fn depth_linux_6_12() {
    depth("6.12");
}
