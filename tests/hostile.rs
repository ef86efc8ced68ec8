//! A guest that misbehaves on purpose (issue 21): `/sbin/hostile` (resources/guest/hostile.c)
//! writes and reads random values of random sizes at random offsets in every PCI function's
//! configuration space and BARs and in the VMM's I/O ports, for a bounded time
//! (`HOTPLUG_VMM_HOSTILE_SECONDS`, 60 unless set), on a guest with disks in a native slot, an
//! ACPI root port's slot and a root-bus ACPI slot. The VMM must come out of it alive: it runs
//! the guest and answers the control socket; its records (`query-block`, `query-pci`,
//! `x-query-hotplug`) agree, and a disk that left (the guest may power its slot off or eject
//! it) did so once, with its `DEVICE_DELETED`; the process has no thread and no file
//! descriptor it did not have before, and its mappings are unchanged but for the I/O rings of
//! the disks that left (nothing outside guest RAM was mapped, unmapped or re-protected on the
//! guest's behalf); and what the guest made it complain about was counted and logged at the
//! bounded rate.
//!
//! The guest may break itself (a root port's bus numbers rewritten, a disk's queue moved):
//! the test asks nothing more of it than that its shell still answers, which both test
//! kernels' do.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::hotplug::{agreed_devices, blockdev_add, hot_add, make_disk};
use common::qmp::QmpClient;
use common::{BootOptions, Guest, TempDir};
use serde_json::json;

/// How long the guest misbehaves; `HOTPLUG_VMM_HOSTILE_SECONDS` overrides.
fn seconds() -> u64 {
    common::env_number("HOTPLUG_VMM_HOSTILE_SECONDS", 60)
}

/// What of the VMM process the guest must not change: its threads by name, its open files by
/// what they are, and its mappings that are not anonymous memory (ranges, permissions, files).
#[derive(Debug, PartialEq)]
struct Process {
    threads: BTreeMap<String, usize>,
    fds: BTreeMap<String, usize>,
    mappings: Vec<String>,
}

impl Process {
    fn of(pid: u32) -> Process {
        let mut threads = BTreeMap::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *threads.entry(comm.trim().to_string()).or_default() += 1;
        }
        let mut fds = BTreeMap::new();
        for f in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(f.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            // Sockets and pipes carry an inode number: keep what they are, not which.
            let kind = match target.split_once(":[") {
                Some((kind, _)) if !kind.starts_with("anon_inode") => kind.to_string(),
                _ => target,
            };
            *fds.entry(kind).or_default() += 1;
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let mappings = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let path = f.get(5).copied().unwrap_or("");
                // Anonymous memory comes and goes with malloc and thread stacks; the thread
                // check covers the stacks. Guest RAM is a named memfd and stays in.
                (!path.is_empty() && path != "[heap]" && path != "[stack]")
                    .then(|| format!("{} {} {}", f[0], f[1], path))
            })
            .collect();
        Process {
            threads,
            fds,
            mappings,
        }
    }

    /// What `after` has that `self` had not (threads and fds, by kind), and how its mappings
    /// differ.
    fn added_in(&self, after: &Process) -> Vec<String> {
        let mut added = Vec::new();
        for (what, mine, theirs) in [
            ("thread", &self.threads, &after.threads),
            ("fd", &self.fds, &after.fds),
        ] {
            for (name, &n) in theirs {
                let had = mine.get(name).copied().unwrap_or(0);
                if n > had {
                    added.push(format!("{} more {what} {name}", n - had));
                }
            }
        }
        for m in &after.mappings {
            if !self.mappings.contains(m) {
                added.push(format!("mapping {m}"));
            }
        }
        for m in &self.mappings {
            if !after.mappings.contains(m) {
                added.push(format!("mapping gone: {m}"));
            }
        }
        added
    }
}

fn hostile(version: &str, seed: u64) {
    let seed = common::env_number("HOTPLUG_VMM_HOSTILE_SEED", seed);
    let dir = TempDir::new(&format!("hostile-{version}"));
    let sock = dir.path("qmp.sock");
    let opts = BootOptions::shared(version).qmp(&sock);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);

    // Disks in a native slot, an ACPI root port's slot and a root-bus ACPI slot: every kind of
    // virtio-pci function and hot-plug register block the guest can reach.
    let ids = ["h0", "h1", "h2"];
    for (id, bus) in ids.iter().zip(["rp0", "rp3", "pcie.0"]) {
        let node = format!("n{id}");
        blockdev_add(&mut q, &node, &make_disk(&dir, &node));
        hot_add(&mut g, &mut q, id, &node, bus);
    }
    let pid = g.pid();
    let before = Process::of(pid);
    let stderr_before = g.stderr_text().lines().count();

    let secs = seconds();
    let (out, status) = g.run_status(
        &format!("hostile {secs} {seed}"),
        Duration::from_secs(secs + 300),
    );
    eprintln!("{version}: {out}");
    assert_eq!(status, 0, "hostile {secs} {seed}: {out}");
    let counts: BTreeMap<&str, &str> = out
        .lines()
        .find(|l| l.starts_with("HOSTILE "))
        .unwrap_or_else(|| g.fail(&format!("no summary from hostile: {out}")))
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    // It reached what it was meant to: config spaces and BARs of the bridge, the four root
    // ports and the three disks, and the VMM's ports.
    let number = |k: &str| counts[k].parse::<u64>().unwrap();
    assert!(number("functions") >= 8, "{out}");
    assert!(number("bars") >= 3, "{out}");
    for k in ["config", "bar", "port"] {
        let (w, r) = counts[k].split_once('/').unwrap();
        let (w, r): (u64, u64) = (w.parse().unwrap(), r.parse().unwrap());
        assert!(w > 0 && r > 0, "no {k} accesses: {out}");
    }
    assert_ne!(counts["mode"], "none", "no way to the VMM's ports: {out}");

    // The VMM: alive, answering, running the guest, whose shell answers.
    let status = q.ok("query-status", json!({}));
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(g.run("echo alive"), "alive");

    // Its records agree with each other. A disk may have left: the guest may power its native
    // slot off or eject its ACPI slot, and a device whose slot the guest powers off is
    // unplugged, as in QEMU. Each that left did so once, with its DEVICE_DELETED.
    let present = agreed_devices(&g, &mut q);
    let left: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !present.contains(*id))
        .collect();
    eprintln!("{version}: devices left: {left:?}");
    for id in &left {
        if q.wait_event("DEVICE_DELETED", Some(id), Duration::from_secs(5))
            .is_none()
        {
            g.fail(&format!("{id} is gone without a DEVICE_DELETED"));
        }
    }

    // Nothing new in the process, and its mappings as they were, but for the I/O rings of the
    // disks that left (two mappings each: the rings and the submission entries).
    let after = Process::of(pid);
    let changes = before.added_in(&after);
    let rings_gone = changes
        .iter()
        .filter(|c| c.starts_with("mapping gone") && c.ends_with("anon_inode:[io_uring]"))
        .count();
    let unexplained: Vec<&String> = changes
        .iter()
        .filter(|c| !(c.starts_with("mapping gone") && c.ends_with("anon_inode:[io_uring]")))
        .collect();
    assert!(
        unexplained.is_empty() && rings_gone <= 2 * left.len(),
        "the guest changed the VMM process ({} disks left): {changes:#?}\nbefore: {before:#?}\nafter: {after:#?}",
        left.len()
    );
    let total = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
    eprintln!(
        "{version}: threads {} -> {}, fds {} -> {}, {rings_gone} ring mappings gone",
        total(&before.threads),
        total(&after.threads),
        total(&before.fds),
        total(&after.fds)
    );

    // Its complaints: counted, and logged at the bounded rate (10 lines per kind per minute,
    // and the line that says how many were left out).
    let log = q.ok("x-query-guest-log", json!({}));
    let kinds = log.as_array().unwrap();
    let complaints: u64 = kinds.iter().map(|k| k["count"].as_u64().unwrap()).sum();
    let lines = g.stderr_text().lines().count() - stderr_before;
    let minutes = secs / 60 + 2;
    let bound = kinds.len() as u64 * 11 * minutes;
    eprintln!("{version}: {lines} stderr lines, {complaints} complaints: {log}");
    assert!(
        (lines as u64) <= bound.max(20),
        "{lines} log lines for {} kinds in {secs} s:\n{}",
        kinds.len(),
        g.stderr_text()
    );
}

#[test]
fn hostile_guest_linux_6_1() {
    hostile("6.1", 1);
}

#[test]
fn hostile_guest_linux_6_12() {
    hostile("6.12", 2);
}
