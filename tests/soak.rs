//! The control plane under a hostile management stack (issue 21): three clients at once send a
//! seeded random mix of `blockdev-add`/`blockdev-del`, `device_add`/`device_del`,
//! `x-surprise-remove` (both in-flight policies: `drop` only on a disk that has been in the
//! guest a few seconds, see [`DROP_AFTER`]), repeats, wrong ids, wrong types and malformed
//! JSON, against native root-port slots, an ACPI root port and the root bus's ACPI slots of a
//! live guest, 1,000 operations in all. Every reply must be a well-formed answer (and bad input
//! an error); afterwards, once no removal is pending, the invariants of the hot-plug core's model
//! test (`devices/src/hotplug/model_tests.rs`) must hold on the live VMM:
//!
//! - `query-block`, `query-pci` and `x-query-hotplug` name the same devices, and the guest's own
//!   `/sys/block` (by serial) and `/sys/bus/pci` agree with them;
//! - `DEVICE_DELETED` came exactly once per device that left: every successful `device_add` of
//!   an id is matched by one event, or by the device still being there;
//! - the guest's shell answers;
//! - once everything is removed, the VMM has the threads and file descriptors it had before the
//!   soak; and of three rounds sharing the operations, the last leaves the VMM's own anonymous
//!   memory (guest RAM's pages not counted) within 1 MiB of where the one before did.
//!
//! The figure (operations, refusals, failures, leaks) is printed; `HOTPLUG_VMM_SOAK_OPS` and
//! `HOTPLUG_VMM_SOAK_SEED` change the run.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hotplug::{agreed_devices, make_disk, open_fds_and_threads, virtio_functions};
use common::qmp::QmpClient;
use common::{BootOptions, Guest, TempDir};
use serde_json::{json, Value};

const CLIENTS: u64 = 3;
const NODES: usize = 6;
const IDS: usize = 6;
/// rp0–rp2 native, rp3 ACPI (the shared machine), and the root bus's ACPI slots.
const BUSES: [&str; 5] = ["rp0", "rp1", "rp2", "rp3", "pcie.0"];

/// splitmix64, as the model test uses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one client saw.
#[derive(Default, Debug)]
struct Tally {
    ops: u64,
    accepted: u64,
    refused: u64,
    /// Replies that were not what the request called for (bad input accepted, a reply without
    /// `return` or `error`, an error without class or description).
    failures: Vec<String>,
    /// Successful `device_add`s, by id.
    added: BTreeMap<String, u64>,
    /// Successful pulls with the `drop` policy.
    drops: u64,
}

/// Requests that are wrong whatever the state: each must be refused.
const BAD: [&str; 9] = [
    "{not json\n",
    "[1, 2]\n",
    "{\"execute\": \"no-such-command\"}\n",
    "{\"execute\": \"device_del\", \"arguments\": {\"id\": \"nope\"}}\n",
    "{\"execute\": \"device_del\", \"arguments\": {\"id\": 7}}\n",
    "{\"execute\": \"blockdev-del\", \"arguments\": {}}\n",
    "{\"execute\": \"device_add\", \"arguments\": {\"driver\": \"virtio-blk-pci\", \"id\": \"x\", \"drive\": 42, \"bus\": \"rp0\"}}\n",
    "{\"execute\": \"device_add\", \"arguments\": {\"driver\": \"virtio-blk-pci\", \"id\": \"x\", \"drive\": \"n0\", \"bus\": \"rp9\"}}\n",
    "{\"execute\": \"x-surprise-remove\", \"arguments\": {\"id\": \"d0\", \"in-flight\": \"maybe\"}}\n",
];

fn well_formed(reply: &Value) -> Result<bool, String> {
    if reply.get("return").is_some() {
        return Ok(true);
    }
    let e = &reply["error"];
    match (e["class"].as_str(), e["desc"].as_str()) {
        (Some(_), Some(d)) if !d.is_empty() => Ok(false),
        _ => Err(format!("not a reply: {reply}")),
    }
}

/// One client's share of the operations.
/// When each present device was added (by any client).
type AddedAt = Arc<Mutex<BTreeMap<String, Instant>>>;

/// How long a disk must have been in the guest before a `drop` pull: long enough for the
/// guest's partition scan at the add to be over, so that no request is in flight. (A `drop`
/// pull of a disk with requests in flight wedges Linux's hot-plug for good: the `drop` hang of
/// docs/surprise-removal.md, pinned by its own tests. Soaking into it would end the soak's
/// guest, not test the VMM.)
const DROP_AFTER: Duration = Duration::from_secs(5);

fn client(
    sock: std::path::PathBuf,
    files: Vec<String>,
    seed: u64,
    ops: u64,
    added_at: AddedAt,
) -> Tally {
    let mut q = QmpClient::negotiated(&sock);
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    for _ in 0..ops {
        let n = rng.below(NODES as u64) as usize;
        let id = format!("d{}", rng.below(IDS as u64));
        let node = format!("n{n}");
        let (what, reply) = match rng.below(100) {
            0..=17 => {
                let args = json!({"driver": "raw", "node-name": node,
                    "file": {"driver": "file", "filename": files[n]}});
                ("blockdev-add", q.cmd("blockdev-add", args))
            }
            18..=27 => (
                "blockdev-del",
                q.cmd("blockdev-del", json!({"node-name": node})),
            ),
            28..=52 => {
                let bus = BUSES[rng.below(BUSES.len() as u64) as usize];
                let args = json!({"driver": "virtio-blk-pci", "id": id, "drive": node, "bus": bus});
                ("device_add", q.cmd("device_add", args))
            }
            53..=67 => ("device_del", q.cmd("device_del", json!({"id": id}))),
            68..=75 => {
                let settled = added_at
                    .lock()
                    .unwrap()
                    .get(&id)
                    .is_some_and(|t| t.elapsed() >= DROP_AFTER);
                let policy = if settled && rng.below(2) == 0 {
                    "drop"
                } else {
                    "fail"
                };
                let args = json!({"id": id, "in-flight": policy});
                let reply = q.cmd("x-surprise-remove", args);
                if reply["return"]["dropped"].as_u64().is_some_and(|n| n > 0) {
                    t.failures.push(format!(
                        "a drop pull of {id} found requests in flight: {reply}"
                    ));
                }
                if policy == "drop" && reply.get("return").is_some() {
                    t.drops += 1;
                }
                ("x-surprise-remove", reply)
            }
            76..=89 => {
                let bad = BAD[rng.below(BAD.len() as u64) as usize];
                let reply = q.send_raw(bad);
                t.ops += 1;
                match well_formed(&reply) {
                    Ok(false) => t.refused += 1,
                    Ok(true) => t.failures.push(format!("accepted {bad:?}: {reply}")),
                    Err(e) => t.failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(rng.below(600)));
                continue;
            }
            _ => {
                let query = [
                    "query-pci",
                    "query-block",
                    "x-query-hotplug",
                    "query-status",
                ][rng.below(4) as usize];
                (query, q.cmd(query, json!({})))
            }
        };
        t.ops += 1;
        match well_formed(&reply) {
            Ok(true) => {
                t.accepted += 1;
                if what == "device_add" {
                    added_at.lock().unwrap().insert(id.clone(), Instant::now());
                    *t.added.entry(id).or_default() += 1;
                }
            }
            Ok(false) => t.refused += 1,
            Err(e) => t.failures.push(format!("{what}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(rng.below(600)));
    }
    t
}

/// Guest RAM of the shared machine (`BootOptions::shared`'s 256 MiB): one mapping of that size.
const GUEST_RAM: u64 = 256 << 20;

/// The VMM's own anonymous memory and guest RAM's, in KiB, from `/proc/PID/smaps`. Guest RAM is
/// a private mapping of the snapshot the guest was restored from, so each page the guest writes
/// becomes anonymous memory of the process (RssAnon counts it): the guest's page cache and slabs
/// growing over a soak are not the VMM's heap. Mappings of guest RAM's size are the guest's.
fn anon_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut own, mut guest, mut is_guest) = (0, 0, false);
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((Ok(start), Ok(end))) =
            range.map(|(a, b)| (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)))
        {
            is_guest = end - start == GUEST_RAM;
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            let kib: u64 = v.split_whitespace().next().unwrap().parse().unwrap();
            *(if is_guest { &mut guest } else { &mut own }) += kib;
        }
    }
    (own, guest)
}

/// Where the VMM's virtio functions are, as the guest addresses them ("bus:slot", the bus
/// numbers the guest programmed into the root ports), from `query-pci`.
fn vmm_addresses(q: &mut QmpClient) -> BTreeSet<String> {
    virtio_functions(&q.ok("query-pci", json!({})))
        .iter()
        .map(|f| {
            format!(
                "{:02x}:{:02x}",
                f["bus"].as_u64().unwrap(),
                f["slot"].as_u64().unwrap()
            )
        })
        .collect()
}

/// Waits until the guest's virtio functions (`/sys/bus/pci`) and its disks (`/sys/block`, by the
/// function each hangs off) are where the VMM's are — a hot-add or removal may still be under
/// way in the guest — and fails if they never get there. Nothing here does I/O to a disk (a
/// disk's `serial` does): a request to a disk pulled with the `drop` policy never ends.
fn wait_guest_agrees(g: &mut Guest, q: &mut QmpClient) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let vmm = vmm_addresses(q);
        let out = g.run(
            "for f in /sys/bus/pci/devices/*; do [ $(cat $f/vendor) = 0x1af4 ] && echo fn ${f##*/}; done; \
             for d in /sys/block/vd*; do [ -e $d ] && echo disk $(readlink -f $d/device/..); done; true",
        );
        let short = |a: &str| {
            // ".../0000:BB:SS.F" -> "BB:SS"
            let f = a.rsplit('/').next().unwrap_or(a);
            f.get(5..10).unwrap_or(f).to_string()
        };
        let functions: BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("fn "))
            .map(short)
            .collect();
        let disks: BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("disk "))
            .map(short)
            .collect();
        if functions == vmm && disks == vmm {
            return;
        }
        if Instant::now() > deadline {
            // What the guest's hot-plug drivers said, and what the slots hold.
            // (Prefixed: the harness leaves lines that look like the kernel's out of a command's
            // output.)
            let dmesg =
                g.run("dmesg | grep -iE 'pciehp|acpiphp|Slot|virtio' | tail -80 | sed 's/^/| /'");
            let slots = q.ok("x-query-hotplug", json!({}));
            g.fail(&format!(
                "the guest disagrees with the VMM: its virtio functions at {functions:?}, its \
                 disks on {disks:?}; the VMM's functions at {vmm:?}\n--- guest dmesg ---\n\
                 {dmesg}\n--- slots ---\n{slots}"
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Waits until no slot has a removal pending.
fn wait_no_pending(g: &Guest, q: &mut QmpClient) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let slots = q.ok("x-query-hotplug", json!({}));
        let pending = slots["slots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| !s["pending"].is_null());
        if !pending {
            return;
        }
        if Instant::now() > deadline {
            g.fail(&format!("removals still pending after the soak: {slots}"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The soak's figures after one round.
struct Round {
    fds: usize,
    threads: usize,
    /// The VMM's own anonymous memory, and guest RAM's ([`anon_kib`]).
    own_kib: u64,
    guest_kib: u64,
}

fn soak(version: &str, seed: u64) {
    let seed = common::env_number("HOTPLUG_VMM_SOAK_SEED", seed);
    let ops: u64 = common::env_number("HOTPLUG_VMM_SOAK_OPS", 1000);
    let dir = TempDir::new(&format!("soak-{version}"));
    let sock = dir.path("qmp.sock");
    // The hot-plug trace outlives the test, for a failure's post-mortem
    // (resources/hotplug-timeline.py reads it).
    let trace = std::env::temp_dir().join(format!("hotplug-vmm-soak-{version}.trace.jsonl"));
    let opts = BootOptions::shared(version)
        .qmp(&sock)
        .hotplug_trace(&trace);
    assert_eq!(
        opts.memory,
        format!("{}M", GUEST_RAM >> 20),
        "anon_kib finds guest RAM by size"
    );
    let mut g = Guest::restore(&opts);
    let files: Vec<String> = (0..NODES)
        .map(|n| make_disk(&dir, &format!("n{n}")).display().to_string())
        .collect();
    let pid = g.pid();
    let (fds, threads) = open_fds_and_threads(pid);
    let (own_kib, guest_kib) = anon_kib(pid);
    let before = Round {
        fds,
        threads,
        own_kib,
        guest_kib,
    };
    // Rounds (three unless HOTPLUG_VMM_SOAK_ROUNDS says) sharing the operations. The VMM's own
    // anonymous memory grows most over the first, while the allocator warms up (glibc keeps
    // ended threads' stacks and their arenas for reuse, and each disk has an I/O thread), then
    // some 100 to 200 KiB a round (docs/hostile-guest.md: heaptrack finds no live allocation
    // behind it). The last round must leave it within 1 MiB of the one before.
    let rounds = common::env_number("HOTPLUG_VMM_SOAK_ROUNDS", 3).max(3);
    let mut after = Vec::new();
    for r in 0..rounds {
        let share = ops / rounds + u64::from(r < ops % rounds);
        after.push(round(
            &mut g,
            &sock,
            &files,
            version,
            seed + 1000 * r,
            share,
        ));
    }
    let list = |f: fn(&Round) -> u64| {
        std::iter::once(f(&before))
            .chain(after.iter().map(f))
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    eprintln!(
        "{version}: after each round: fds {}, threads {}, the VMM's anonymous memory {} KiB \
         (guest RAM's written pages {} KiB)",
        list(|r| r.fds as u64),
        list(|r| r.threads as u64),
        list(|r| r.own_kib),
        list(|r| r.guest_kib)
    );
    for r in &after {
        assert_eq!(
            (r.fds, r.threads),
            (before.fds, before.threads),
            "fds and threads after a round"
        );
    }
    let (last, before_last) = (&after[after.len() - 1], &after[after.len() - 2]);
    assert!(
        last.own_kib <= before_last.own_kib + 1024,
        "the VMM's anonymous memory grew from {} to {} KiB in the last round",
        before_last.own_kib,
        last.own_kib
    );
}

/// `ops` operations from the clients, the checks, everything removed; returns the figures.
fn round(
    g: &mut Guest,
    sock: &std::path::Path,
    files: &[String],
    version: &str,
    seed: u64,
    ops: u64,
) -> Round {
    let pid = g.pid();
    // An observer that reads every event as it comes.
    let stop = Arc::new(AtomicBool::new(false));
    let observer = {
        let sock = sock.to_path_buf();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut q = QmpClient::negotiated(&sock);
            while !stop.load(Ordering::Relaxed) {
                q.wait_event_where(|_| false, Duration::from_millis(500));
            }
            q
        })
    };
    let started = Instant::now();
    let added_at = AddedAt::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (sock, files, added_at) = (sock.to_path_buf(), files.to_vec(), added_at.clone());
            let share = ops / CLIENTS + u64::from(c < ops % CLIENTS);
            std::thread::spawn(move || client(sock, files, seed * 16 + c, share, added_at))
        })
        .collect();
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let soak_time = started.elapsed();

    let mut q = QmpClient::negotiated(sock);
    wait_no_pending(g, &mut q);
    agreed_devices(g, &mut q);
    wait_guest_agrees(g, &mut q);
    assert_eq!(g.run("echo alive"), "alive");

    // Exactly one DEVICE_DELETED per device that left, counted against the devices present at
    // a moment when nothing changes: asked on the observer's connection, twice, with no event
    // between (the guest's acpiphp may still eject a device of its own accord).
    stop.store(true, Ordering::Relaxed);
    let mut observer = observer.join().unwrap();
    let present = loop {
        let events = observer.all_events.len();
        let first = agreed_devices(g, &mut observer);
        observer.wait_event_where(|_| false, Duration::from_secs(1));
        let second = agreed_devices(g, &mut observer);
        if first == second && observer.all_events.len() == events {
            break second;
        }
    };
    let mut deleted: BTreeMap<String, u64> = BTreeMap::new();
    for e in observer
        .all_events
        .iter()
        .filter(|e| e["event"] == "DEVICE_DELETED")
    {
        *deleted
            .entry(e["data"]["device"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut added: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (id, n) in &t.added {
            *added.entry(id.clone()).or_default() += n;
        }
    }
    for i in 0..IDS {
        let id = format!("d{i}");
        let a = added.get(&id).copied().unwrap_or(0);
        let d = deleted.get(&id).copied().unwrap_or(0);
        let p = u64::from(present.contains(&id));
        assert_eq!(a, d + p, "{id}: {a} adds, {d} DEVICE_DELETED, present: {p}");
    }

    // Everything removed, so that the process can be compared with what it was.
    observer.events.clear();
    for id in &present {
        observer.ok("device_del", json!({"id": id}));
    }
    for id in &present {
        if observer
            .wait_event("DEVICE_DELETED", Some(id), Duration::from_secs(120))
            .is_none()
        {
            g.fail(&format!("no DEVICE_DELETED for {id} after the soak"));
        }
    }
    for n in 0..NODES {
        observer.cmd("blockdev-del", json!({"node-name": format!("n{n}")}));
    }
    wait_guest_agrees(g, &mut observer);
    drop(observer);
    drop(q);
    std::thread::sleep(Duration::from_millis(500));
    let (fds, threads) = open_fds_and_threads(pid);
    let (own_kib, guest_kib) = anon_kib(pid);

    let total = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    eprintln!(
        "{version}: soak round of {} operations from {CLIENTS} clients in {:.0} s (seed {seed}): \
         {} accepted, {} refused, {} failures; {} adds, {} DEVICE_DELETED, {} drop pulls; \
         then fds {fds}, threads {threads}, the VMM's anonymous memory {own_kib} KiB \
         (guest RAM's written pages {guest_kib} KiB)",
        total(|t| t.ops),
        soak_time.as_secs_f64(),
        total(|t| t.accepted),
        total(|t| t.refused),
        failures.len(),
        added.values().sum::<u64>(),
        deleted.values().sum::<u64>(),
        total(|t| t.drops),
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(total(|t| t.ops), ops);
    Round {
        fds,
        threads,
        own_kib,
        guest_kib,
    }
}

#[test]
fn control_plane_soak_linux_6_1() {
    soak("6.1", 1);
}

#[test]
fn control_plane_soak_linux_6_12() {
    soak("6.12", 2);
}
