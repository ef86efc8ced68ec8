//! Booted guests, saved once per machine and restored per test.
//!
//! A boot of the test guest costs 40–60 s on PVM hosts, a restore of it under a second
//! (docs/migration.md). A test for which a fresh boot is not the point takes its guest from
//! [`Guest::restore`]: the first test that asks for a machine — kernel, initramfs, vCPUs,
//! memory, kernel parameters and [`BootOptions::machine`] — boots it, waits until its shell
//! answers and saves it with `migrate file:`; that test and every later one restore the file
//! into a VMM of their own, started with their own other options (control socket, policies,
//! trace). Tests that ask for the same machine at once wait for the one boot.
//!
//! The snapshots hold no disks (a disk's file is checked by identity on restore, and each test
//! makes its own): a restored test hot-adds what it uses, and cold-plug is tested by the tests
//! that boot. The files live in Cargo's scratch directory for tests, named after the test
//! process; those of processes that have ended are removed when the next one starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use super::migration::{migrate, status_after_incoming, wait_migration};
use super::qmp::QmpClient;
use super::{BootOptions, Guest};

/// One snapshot per machine (with its number, for its file's name), made by the first test
/// that asks for it.
type Snapshots = Mutex<BTreeMap<String, (usize, Arc<OnceLock<PathBuf>>)>>;

static SNAPSHOTS: OnceLock<Snapshots> = OnceLock::new();

/// Where this test process keeps its snapshots; made, and swept of other processes' leftovers,
/// on first use.
fn directory() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-snapshots");
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().unwrap_or_default();
            if !Path::new("/proc").join(pid).exists() || pid.is_empty() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        dir
    })
}

/// What a snapshot of `opts`'s booted guest is kept by: everything that shapes the guest
/// before its first command.
fn machine_key(opts: &BootOptions) -> String {
    format!(
        "{:?} {:?} cpus={} memory={} cmdline={:?} machine={:?}",
        opts.kernel, opts.initramfs, opts.cpus, opts.memory, opts.extra_cmdline, opts.machine
    )
}

/// The snapshot of `opts`'s machine, booted and saved by the first caller.
pub fn snapshot_of(opts: &BootOptions) -> PathBuf {
    let (n, cell) = {
        let mut all = SNAPSHOTS.get_or_init(Snapshots::default).lock().unwrap();
        let n = all.len();
        all.entry(machine_key(opts))
            .or_insert_with(|| (n, Arc::default()))
            .clone()
    };
    cell.get_or_init(|| boot_and_save(opts, n)).clone()
}

/// Boots `opts`'s machine with nothing but a control socket, and saves it once its shell
/// answers; returns the file.
fn boot_and_save(opts: &BootOptions, n: usize) -> PathBuf {
    let dir = directory();
    let pid = std::process::id();
    let file = dir.join(format!("{pid}-{n}.snap"));
    let sock = dir.join(format!("{pid}-{n}.sock"));
    let mut boot = opts.clone();
    boot.extra_args = vec!["--qmp".into(), sock.display().to_string()];
    let (mut g, _) = Guest::boot(&boot);
    g.run("true");
    let mut q = QmpClient::negotiated(&sock);
    migrate(&mut q, &format!("file:{}", file.display()));
    wait_migration(&mut q, "completed");
    q.ok("quit", json!({}));
    g.wait_exit(Duration::from_secs(30));
    eprintln!("{}: saved to {}", g.name, file.display());
    file
}

impl Guest {
    /// A guest of `opts`'s machine, restored from its snapshot (booted for it by the first
    /// test that asks) into a VMM started with `opts`'s other options; returns once the
    /// guest's shell answers. `opts.extra_args` must name a control socket (`--qmp`).
    pub fn restore(opts: &BootOptions) -> Guest {
        let snap = snapshot_of(opts);
        let sock = opts
            .extra_args
            .iter()
            .position(|a| a == "--qmp")
            .map(|i| PathBuf::from(&opts.extra_args[i + 1]))
            .expect("a restored guest's options name a control socket");
        let mut o = opts.clone();
        o.extra_args
            .extend(["--incoming".into(), format!("file:{}", snap.display())]);
        let started = Instant::now();
        let mut g = Guest::start(&o);
        let mut q = QmpClient::negotiated(&sock);
        let state = status_after_incoming(&mut q);
        if state != "running" {
            g.fail(&format!("restored into {state}, not running"));
        }
        drop(q);
        g.run("true");
        eprintln!(
            "{}: restored, the shell answers after {:.2}s",
            g.name,
            started.elapsed().as_secs_f64()
        );
        g
    }
}
