//! A migration out of this VM (`migrate`): on its own thread, so that the control socket
//! answers at once and reports progress (`query-migrate`, `MIGRATION` events).
//!
//! - `file:PATH` and `exec:COMMAND`: the VM is stopped first, then its memory and state are
//!   written; the downtime is the whole save.
//! - `unix:PATH`: the destination first checks that the machine fits and says so; then guest
//!   memory is sent while the guest runs, pass after pass with KVM's dirty log (and the disks'
//!   writes into guest memory, tracked by the VMM), until what is left is small; then the VM is
//!   stopped, the rest and the state are sent, and the destination says it has taken them.
//!
//! Whatever the transport, a migration that fails or is cancelled leaves the VM as it was
//! (running if it ran), and one that completes leaves it stopped (`postmigrate`). Hot-plug
//! commands are refused meanwhile, but the guest's answers to a removal asked for earlier are
//! still recorded, up to the final stop, and travel in the state.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::compat::MachineConfig;
use super::dirty;
use super::memory::{self, PassStats};
use super::status::{MigrationInfo, Status};
use super::stream::{tag, StreamWriter, FLAG_IMAGE, HEADER_LEN, PAGE_SIZE, RECORD_HEADER_LEN};
use super::uri::MigrationUri;
use crate::run_state::RunStateError;
use crate::runtime::Runtime;

/// Why a migration did not complete.
enum Failure {
    Cancelled,
    Error(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(e.to_string())
    }
}

/// Starts migrating `rt` to `uri`. Refused if a migration is under way, or the VM is being
/// migrated in.
pub fn start(rt: Arc<Runtime>, uri: MigrationUri) -> Result<(), RunStateError> {
    rt.shared.run().start_migration()?;
    rt.shared.cancel.store(false, Ordering::Release);
    let ram: u64 = rt.machine.memory;
    *rt.shared.migration() = MigrationInfo::starting(ram);
    rt.shared.set_migration_status(Status::Setup);
    let thread_rt = rt.clone();
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let result = migrate(&thread_rt, &uri);
            finish(&thread_rt, result);
        });
    if let Err(e) = spawned {
        finish(&rt, Err(Failure::Error(format!("cannot start: {e}"))));
    }
    Ok(())
}

fn cancelled(rt: &Runtime) -> Result<(), Failure> {
    if rt.shared.cancel.load(Ordering::Acquire) {
        Err(Failure::Cancelled)
    } else {
        Ok(())
    }
}

fn finish(rt: &Runtime, result: Result<(), Failure>) {
    let completed = result.is_ok();
    rt.shared.migration_ending(match &result {
        Err(Failure::Error(e)) => Some(e),
        _ => None,
    });
    {
        let mut run = rt.shared.run();
        let effect = run.end_migration(completed);
        rt.apply(effect);
    }
    let status = match result {
        Ok(()) => Status::Completed,
        Err(Failure::Cancelled) => Status::Cancelled,
        Err(Failure::Error(e)) => {
            log::warn!("migration failed: {e}");
            Status::Failed
        }
    };
    rt.shared.set_migration_status(status);
}

fn migrate(rt: &Runtime, uri: &MigrationUri) -> Result<(), Failure> {
    let setup = Instant::now();
    match uri {
        MigrationUri::File(path) => {
            let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
            rt.shared.migration().setup_time = Some(setup.elapsed());
            save_image(rt, &file, path)
        }
        MigrationUri::Exec(command) => {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("exec:{command}: {e}"))?;
            let stdin = child.stdin.take().ok_or("exec: no standard input")?;
            rt.shared.migration().setup_time = Some(setup.elapsed());
            let sent = send_stopped(rt, std::io::BufWriter::with_capacity(1 << 20, stdin));
            let status = child.wait().map_err(|e| format!("exec:{command}: {e}"))?;
            sent?;
            if !status.success() {
                return Err(Failure::Error(format!(
                    "exec:{command} ended with {status}"
                )));
            }
            Ok(())
        }
        MigrationUri::Unix(path) => {
            let stream = UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
            rt.shared.migration().setup_time = Some(setup.elapsed());
            send_unix(rt, stream)
        }
        MigrationUri::Defer => Err(Failure::Error("defer is for --incoming only".into())),
    }
}

/// Stops the VM for the last stage; from here on the downtime runs.
fn stop_for_last_stage(rt: &Runtime) -> (Instant, bool) {
    let mut run = rt.shared.run();
    let ran = run.ran_when_migration_started();
    let effect = run.finish_migration();
    let stopped = Instant::now();
    rt.apply(effect);
    drop(run);
    rt.shared.set_migration_status(Status::Device);
    (stopped, ran)
}

fn count(rt: &Runtime, stats: PassStats, transferred: u64) {
    let mut m = rt.shared.migration();
    m.normal_pages += stats.normal;
    m.zero_pages += stats.zero;
    m.passes += 1;
    m.transferred = transferred;
}

fn conf(rt: &Runtime) -> Result<Vec<u8>, Failure> {
    Ok(serde_json::to_vec::<MachineConfig>(&rt.machine)?)
}

/// `exec:`: stop, then the whole stream.
fn send_stopped<W: Write>(rt: &Runtime, out: W) -> Result<(), Failure> {
    rt.shared.set_migration_status(Status::Active);
    let mut w = StreamWriter::new(out, 0)?;
    w.record(tag::CONF, &[&conf(rt)?])?;
    cancelled(rt)?;
    let (stopped, ran) = stop_for_last_stage(rt);
    // SAFETY: the vCPUs are parked and the disks paused (the last stage): nothing writes
    // guest memory until the migration ends.
    let stats = unsafe { memory::send_paused(&rt.memory, &mut w) }?;
    count(rt, stats, w.written());
    cancelled(rt)?;
    let written = send_state(rt, ran, &mut w)?;
    w.finish()?;
    let mut m = rt.shared.migration();
    m.transferred = written;
    m.downtime = Some(stopped.elapsed());
    Ok(())
}

/// The last records of a stream: the stopped machine's state (`ran`: whether it ran when the
/// migration started) and the end, flushed. Returns the bytes written in all.
fn send_state<W: Write>(rt: &Runtime, ran: bool, w: &mut StreamWriter<W>) -> Result<u64, Failure> {
    let state = serde_json::to_vec(&rt.save(ran)?)?;
    w.record(tag::STAT, &[&state])?;
    w.record(tag::DONE, &[])?;
    w.get_mut().flush()?;
    Ok(w.written())
}

/// `file:`: stop, then the records and the memory image.
fn save_image(rt: &Runtime, file: &File, path: &Path) -> Result<(), Failure> {
    rt.shared.set_migration_status(Status::Active);
    let (stopped, ran) = stop_for_last_stage(rt);
    let conf = conf(rt)?;
    let state = serde_json::to_vec(&rt.save(ran)?)?;
    cancelled(rt)?;
    // The image goes after the records; their size depends on the image's layout only through
    // the IMAG record, which a first pass measures. Write the image first, then the records.
    let reserve = |layout_len: u64| {
        let records = HEADER_LEN as u64
            + 4 * RECORD_HEADER_LEN as u64
            + conf.len() as u64
            + state.len() as u64
            + layout_len;
        records.div_ceil(PAGE_SIZE) * PAGE_SIZE
    };
    // The layout's JSON is at most ~40 bytes a run; leave room for it.
    let runs_bound = rt.machine.memory / PAGE_SIZE;
    let data_offset = reserve(256 + 48 * runs_bound.min(1 << 20));
    // SAFETY: the VM is stopped for the last stage: nothing writes guest memory.
    let (layout, stats) = unsafe { memory::write_image(&rt.memory, file, data_offset) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let layout_json = serde_json::to_vec(&layout)?;
    if reserve(layout_json.len() as u64) > data_offset {
        return Err(Failure::Error(
            "the memory image layout outgrew its room".into(),
        ));
    }
    let mut w = StreamWriter::new(std::io::BufWriter::new(file), FLAG_IMAGE)?;
    w.record(tag::CONF, &[&conf])?;
    w.record(tag::STAT, &[&state])?;
    w.record(tag::IMAG, &[&layout_json])?;
    w.record(tag::DONE, &[])?;
    w.finish()?;
    file.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    count(rt, stats, data_offset + stats.normal * PAGE_SIZE);
    rt.shared.migration().downtime = Some(stopped.elapsed());
    Ok(())
}

/// Reads the destination's answer: `OK`, or `ERR` and why.
fn answer(reader: &mut impl BufRead, when: &str) -> Result<(), Failure> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("the destination did not answer {when}: {e}"))?;
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "OK" => Ok(()),
        Some(("ERR", why)) => Err(Failure::Error(format!("the destination refused: {why}"))),
        _ if line.is_empty() => Err(Failure::Error(format!(
            "the destination closed the connection {when}"
        ))),
        _ => Err(Failure::Error(format!(
            "the destination answered {:?} {when}",
            line.trim_end()
        ))),
    }
}

/// Passes over guest memory at most before the last stage, whatever is left.
const MAX_PASSES: u64 = 30;
/// Dirty pages few enough to send with the guest stopped (4 MiB).
const LAST_STAGE_PAGES: u64 = 1024;

/// `unix:`: the destination checks the machine, memory goes while the guest runs, then the
/// last stage.
fn send_unix(rt: &Runtime, stream: UnixStream) -> Result<(), Failure> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = StreamWriter::new(std::io::BufWriter::with_capacity(1 << 20, stream), 0)?;
    w.record(tag::CONF, &[&conf(rt)?])?;
    w.get_mut().flush()?;
    answer(&mut reader, "about the machine")?;
    rt.shared.set_migration_status(Status::Active);
    dirty::log_dirty_pages(&rt.vm, &rt.memory, true)?;
    let result = precopy(rt, &mut w).and_then(|()| last_stage(rt, &mut w, &mut reader));
    if let Err(e) = dirty::log_dirty_pages(&rt.vm, &rt.memory, false) {
        log::warn!("stopping the dirty log: {e}");
    }
    result
}

/// Sends guest memory while the guest runs until what it dirties between two passes is few
/// pages, stops getting fewer, or [`MAX_PASSES`] passes went.
fn precopy<W: Write>(rt: &Runtime, w: &mut StreamWriter<W>) -> Result<(), Failure> {
    dirty::clear_device_bits(&rt.memory);
    // Forget what the log collected before: the first pass sends everything.
    dirty::take_dirty(&rt.vm, &rt.memory)?;
    let stats = memory::send_running(&rt.memory, None, w)?;
    count(rt, stats, w.written());
    let mut best = u64::MAX;
    let mut stalled = 0;
    for _ in 1..MAX_PASSES {
        cancelled(rt)?;
        let bits = dirty::take_dirty(&rt.vm, &rt.memory)?;
        let pages = dirty::count(&bits);
        rt.shared.migration().remaining_pages = pages;
        if pages <= LAST_STAGE_PAGES {
            // Left for the last stage, together with what the guest dirties meanwhile.
            return resend_later(rt, &bits, w);
        }
        if pages >= best {
            stalled += 1;
            if stalled >= 3 {
                return resend_later(rt, &bits, w);
            }
        } else {
            best = pages;
            stalled = 0;
        }
        let stats = memory::send_running(&rt.memory, Some(&bits), w)?;
        count(rt, stats, w.written());
    }
    Ok(())
}

/// The pages in `bits` were taken off the log but not sent: send them now, while the guest
/// runs (the last stage sends what the guest dirtied since).
fn resend_later<W: Write>(
    rt: &Runtime,
    bits: &[Vec<u64>],
    w: &mut StreamWriter<W>,
) -> Result<(), Failure> {
    let stats = memory::send_running(&rt.memory, Some(bits), w)?;
    count(rt, stats, w.written());
    Ok(())
}

/// Stops the guest, sends the pages dirtied since the last pass and the state, and waits for
/// the destination to take them.
fn last_stage<W: Write>(
    rt: &Runtime,
    w: &mut StreamWriter<W>,
    reader: &mut impl BufRead,
) -> Result<(), Failure> {
    cancelled(rt)?;
    let (stopped, ran) = stop_for_last_stage(rt);
    let bits = dirty::take_dirty(&rt.vm, &rt.memory)?;
    rt.shared.migration().remaining_pages = dirty::count(&bits);
    let stats = memory::send_running(&rt.memory, Some(&bits), w)?;
    count(rt, stats, w.written());
    let written = send_state(rt, ran, w)?;
    answer(reader, "after the state")?;
    let mut m = rt.shared.migration();
    m.transferred = written;
    m.remaining_pages = 0;
    m.downtime = Some(stopped.elapsed());
    Ok(())
}
