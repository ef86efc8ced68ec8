//! Helpers for the hot-plug tests: disks with a signature, hot-add and removal through the
//! control socket, and what the guest reports about its disks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::qmp::QmpClient;
use super::{Guest, TempDir};

/// How long the guest may take to answer a hot-add (its pciehp powers the slot and probes).
pub const ADD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a graceful removal may take: pciehp's 5 s grace period, the driver's teardown, the
/// power-off sequence.
pub const DEL_TIMEOUT: Duration = Duration::from_secs(90);

/// 16 bytes at the start of each disk, so the guest's read proves which file it got.
pub fn signature(name: &str) -> String {
    format!("{:<16}", format!("SIG:{name}"))
}

pub fn make_disk(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.path(&format!("{name}.img"));
    let mut data = vec![0u8; 8 << 20];
    data[..16].copy_from_slice(signature(name).as_bytes());
    std::fs::write(&path, data).unwrap();
    path
}

pub fn blockdev_add(q: &mut QmpClient, node: &str, path: &Path) {
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": node,
               "file": {"driver": "file", "filename": path.display().to_string()}}),
    );
}

/// `device_add` of `id` (using node `node`) onto `bus`; waits for the guest's block device and
/// checks that it reads the file's signature. Returns the guest's device name (vdX).
pub fn hot_add(g: &mut Guest, q: &mut QmpClient, id: &str, node: &str, bus: &str) -> String {
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": id, "drive": node, "bus": bus}),
    );
    let line = g.wait_for_line(|l| block_event(l, "BLOCK-ADD").is_some(), ADD_TIMEOUT);
    let dev = block_event(&line, "BLOCK-ADD").unwrap();
    check_disk(g, &dev, id, node);
    dev
}

/// The device of a "BLOCK-ADD vdX uptime=..." (or BLOCK-REMOVE) report of the guest's /init;
/// the line may follow a shell prompt.
pub fn block_event(line: &str, kind: &str) -> Option<String> {
    let rest = &line[line.find(kind)? + kind.len()..];
    let dev = rest.split_whitespace().next()?;
    dev.starts_with("vd").then(|| dev.to_string())
}

/// `/dev/dev` has serial `id` and reads `node`'s signature.
pub fn check_disk(g: &mut Guest, dev: &str, id: &str, node: &str) {
    let serial = g.run(&format!("cat /sys/block/{dev}/serial"));
    assert_eq!(serial.trim(), id, "serial of {dev}");
    let data = g.run(&format!("head -c 16 /dev/{dev}"));
    assert_eq!(data.trim_end(), signature(node).trim_end(), "data of {dev}");
}

/// The guest's disks: (vdX, serial).
pub fn guest_disks(g: &mut Guest) -> Vec<(String, String)> {
    let out = g
        .run("for d in /sys/block/vd*; do [ -e $d ] && echo ${d##*/} $(cat $d/serial); done; true");
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(d, s)| (d.to_string(), s.trim().to_string()))
        .collect()
}

/// Waits for DEVICE_DELETED of `id`; fails with the slot state if it does not come.
pub fn wait_deleted(g: &Guest, q: &mut QmpClient, id: &str) -> Value {
    match q.wait_event("DEVICE_DELETED", Some(id), DEL_TIMEOUT) {
        Some(e) => e,
        None => {
            let slots = q.ok("x-query-hotplug", json!({}));
            g.fail(&format!("no DEVICE_DELETED for {id}; slots: {slots}"))
        }
    }
}

/// The x-query-hotplug entry of the slot on `bus` (a root port id); `slots` is the query's
/// reply or its `slots` list.
pub fn slot<'a>(slots: &'a Value, bus: &str) -> &'a Value {
    slots
        .get("slots")
        .unwrap_or(slots)
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["bus"] == bus)
        .unwrap_or_else(|| panic!("{bus} not in {slots}"))
}

pub fn open_fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).unwrap().count();
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}
