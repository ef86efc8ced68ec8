//! Helpers for the hot-plug tests: disks with a signature, hot-add and removal through the
//! control socket, and what the guest reports about its disks.

use std::collections::BTreeSet;
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
    blockdev_add_as(q, node, path, "raw");
}

/// `blockdev-add` of a `driver` (`raw`, `qcow2`) node over the file at `path`.
pub fn blockdev_add_as(q: &mut QmpClient, node: &str, path: &Path, driver: &str) {
    q.ok(
        "blockdev-add",
        json!({"driver": driver, "node-name": node,
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

/// Cycles for a leak check: 50, or `HOTPLUG_VMM_HOTPLUG_CYCLES`.
pub fn cycles() -> usize {
    super::env_number("HOTPLUG_VMM_HOTPLUG_CYCLES", 50) as usize
}

pub fn open_fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).unwrap().count();
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

/// How long the guest may take to notice a vanished device and remove it.
pub const GONE_TIMEOUT: Duration = Duration::from_secs(90);

/// Direct readers started on `/dev/dev`: each reads the whole disk in 4 KiB `O_DIRECT` requests,
/// over and over, until a read fails, then writes "READER i EXIT status" to /tmp/readers-dev
/// (and dd's complaint to /tmp/dd-dev-i). One long dd per pass: starting a process takes about
/// a second on PVM hosts, and a reader must be reading, not starting, when the disk goes.
pub fn start_readers(g: &mut Guest, dev: &str, n: usize, want: usize) {
    g.run(&format!(
        "rm -f /tmp/readers-{dev}; for i in $(seq 1 {n}); do \
         (while :; do dd if=/dev/{dev} of=/dev/null bs=4k iflag=direct \
         2>/tmp/dd-{dev}-$i || {{ echo \"READER $i EXIT $?\" >> /tmp/readers-{dev}; break; }}; done) & \
         done"
    ));
    wait_in_flight(g, dev, Direction::Read, want);
}

/// Which column of /sys/block/dev/inflight.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// Waits until the guest's driver has at least `want` requests of `dir` in the device (held
/// there by the caller, or waiting on a slow disk): `inflight` counts the requests the driver
/// has started and not seen completed (not those still queued in the block layer, which `stat`
/// counts too).
pub fn wait_in_flight(g: &mut Guest, dev: &str, dir: Direction, want: usize) {
    let field = dir as usize + 1;
    let (out, status) = g.run_status(
        &format!(
            "for i in $(seq 1 60); do set -- $(cat /sys/block/{dev}/inflight); \
             [ ${field} -ge {want} ] && break; sleep 0.5; done; cat /sys/block/{dev}/inflight /sys/block/{dev}/stat"
        ),
        Duration::from_secs(120),
    );
    let inflight: u64 = out
        .split_whitespace()
        .nth(dir as usize)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    eprintln!("{dev}: in flight ({dir:?}): {out}");
    if status != 0 || inflight < want as u64 {
        let state = g.run(&format!(
            "ps; ls -l /dev/{dev}; cat /tmp/dd-{dev}-* /tmp/readers-{dev} /tmp/wr-{dev}; true"
        ));
        g.fail(&format!(
            "{want} {dir:?} requests in flight on {dev}: {out}\n{state}"
        ));
    }
}

/// Makes an ext4 file system in the image at `path`, on the host (the test guest carries no
/// mke2fs: every byte of its initramfs costs boot time). Its inode tables and journal are
/// initialised here, so the guest's ext4 has no lazy-init work to do, and nothing is discarded
/// (a test can then see the guest's discards as holes in the file). The first 1 KiB, where
/// [`make_disk`] put the disk's signature, is kept (ext4 leaves it to boot loaders; mke2fs
/// zeroes it).
pub fn format_ext4(path: &Path) {
    format_ext4_with(path, None)
}

/// [`format_ext4`], with the file system holding a copy of directory `contents` (mke2fs -d).
pub fn format_ext4_with(path: &Path, contents: Option<&Path>) {
    use std::io::{Read, Seek, Write};
    let mut boot_block = [0u8; 1024];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut boot_block))
        .unwrap();
    super::host_run(
        std::process::Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            ])
            .args(contents.iter().flat_map(|d| [Path::new("-d"), d]))
            .arg(path),
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.rewind().unwrap();
    f.write_all(&boot_block).unwrap();
}

/// A writer on the ext4 of `/dev/dev` (made by [`format_ext4`]), mounted at /mnt/dev: appends
/// 64 KiB blocks with fsync until one fails, then writes "WRITER EXIT status" to
/// /tmp/writer-dev.
///
/// The file system does no I/O of its own accord: its inode tables and journal were initialised
/// by mke2fs (no lazy-init thread writing later) and the journal commits on the writer's fsync
/// only (`commit=600`), so that every request is the writer's, and a test that holds them knows
/// none comes after.
pub fn start_ext4_writer(g: &mut Guest, dev: &str) {
    g.run(&format!(
        "mkdir -p /mnt/{dev} && mount -t ext4 -o commit=600 /dev/{dev} /mnt/{dev}"
    ));
    g.run(&format!(
        "rm -f /tmp/writer-{dev}; (i=0; while :; do \
         dd if=/dev/zero of=/mnt/{dev}/f$((i%8)) bs=64k count=4 conv=fsync 2>/tmp/wr-{dev} \
         || {{ echo \"WRITER EXIT $?\" >> /tmp/writer-{dev}; break; }}; i=$((i+1)); done) &"
    ));
    g.run("sleep 1");
    let files = g.run(&format!("ls /mnt/{dev}"));
    assert!(files.contains("f0"), "the writer writes: {files}");
}

/// Waits for the guest's report that `dev` disappeared.
pub fn wait_block_removed(g: &mut Guest, dev: &str) {
    let d = dev.to_string();
    g.wait_for_line(
        move |l| block_event(l, "BLOCK-REMOVE").as_deref() == Some(d.as_str()),
        GONE_TIMEOUT,
    );
}

/// How long [`wait_lines`] waits, in the guest's own time.
pub const LINES_WAIT_SECS: u64 = 90;

/// Waits until `path` in the guest has `lines` lines, for at most [`LINES_WAIT_SECS`] of the
/// guest's uptime; returns its content. The shell counts with builtins only (a process start
/// takes about a second in these guests) and reads the clock from /proc/uptime, so the wait
/// ends on time even when the processes that should write the lines never end, and the
/// harness's longer timeout is left to mean what it says: the console stopped. If the lines
/// never come, the test fails naming what the file holds, the guest's tasks in D state and its
/// virtio interrupt counts.
pub fn wait_lines(g: &mut Guest, path: &str, lines: usize) -> String {
    try_wait_lines(g, path, lines).unwrap_or_else(|why| g.fail(&why))
}

/// [`wait_lines`], returning why instead of failing.
pub fn try_wait_lines(g: &mut Guest, path: &str, lines: usize) -> Result<String, String> {
    let (out, status) = g.run_status(
        &format!(
            "read up _ < /proc/uptime; end=$((${{up%.*}} + {LINES_WAIT_SECS})); \
             while :; do n=0; [ -e {path} ] && while read -r _; do n=$((n+1)); done < {path}; \
             [ $n -ge {lines} ] && break; read up _ < /proc/uptime; [ ${{up%.*}} -ge $end ] && break; \
             sleep 0.2; done; cat {path} 2>/dev/null; [ $n -ge {lines} ]"
        ),
        Duration::from_secs(LINES_WAIT_SECS + 90),
    );
    if status == 0 {
        return Ok(out);
    }
    let stuck = d_state_tasks(g);
    let irqs = g.run("grep -E 'virtio|pcie|acpi' /proc/interrupts; true");
    Err(format!(
        "{path} has not got {lines} lines after {LINES_WAIT_SECS} s of the guest's time \
         (a process that should have written one never ended): {out:?}; \
         tasks in D state: {stuck:?}; interrupts:\n{irqs}"
    ))
}

/// Names of the guest's tasks in uninterruptible sleep (D state).
pub fn d_state_tasks(g: &mut Guest) -> Vec<String> {
    // One grep over every status file: a process per task would take minutes on PVM hosts.
    let out = g.run("grep -H -E '^(Name|State):' /proc/[0-9]*/status 2>/dev/null; true");
    let mut names = std::collections::BTreeMap::new();
    let mut stuck = Vec::new();
    for line in out.lines() {
        let Some((file, rest)) = line.split_once(":") else {
            continue;
        };
        if let Some(name) = rest.strip_prefix("Name:") {
            names.insert(file.to_string(), name.trim().to_string());
        } else if rest.starts_with("State:") && rest.contains("D (") {
            stuck.push(file.to_string());
        }
    }
    stuck.iter().filter_map(|f| names.get(f).cloned()).collect()
}

/// The virtio functions `query-pci` lists, on the root bus and behind root ports.
pub fn virtio_functions(pci: &Value) -> Vec<Value> {
    let mut found = Vec::new();
    for d in pci[0]["devices"].as_array().unwrap() {
        let below = d["pci_bridge"]["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for f in std::iter::once(d).chain(below.iter()) {
            if f["id"]["vendor"] == 0x1af4 {
                found.push(f.clone());
            }
        }
    }
    found
}

/// The ids of the virtio functions `query-pci` lists.
pub fn pci_ids(pci: &Value) -> BTreeSet<String> {
    virtio_functions(pci)
        .iter()
        .map(|f| f["qdev_id"].as_str().unwrap().to_string())
        .collect()
}

/// The device ids the three queries name, failing when they disagree.
pub fn agreed_devices(g: &Guest, q: &mut QmpClient) -> BTreeSet<String> {
    let block: BTreeSet<String> = q
        .ok("query-block", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["qdev"].as_str().unwrap().to_string())
        .collect();
    let pci = pci_ids(&q.ok("query-pci", json!({})));
    let slots = q.ok("x-query-hotplug", json!({}));
    let occupants: BTreeSet<String> = slots["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["occupant"].as_str().map(str::to_string))
        .collect();
    if block != pci || pci != occupants {
        g.fail(&format!(
            "the VMM's records disagree: query-block {block:?}, query-pci {pci:?}, \
             x-query-hotplug occupants {occupants:?}\n{slots}"
        ));
    }
    block
}
