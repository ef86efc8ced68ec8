//! A migration into this VM (`--incoming`): waits for the stream (or, with `defer`, for
//! `migrate-incoming` to say where it comes from), checks that the source's machine is this
//! one's, reads guest memory and the machine's state, and opens the disks' backing files —
//! each refused, with a one-line reason, before anything runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use devices::virtio::GuestRam;

use super::compat::{self, MachineConfig};
use super::memory::{self, ImageLayout, PassStats};
use super::status::{MigrationInfo, Status};
use super::stream::{tag, tag_name, StreamError, StreamReader, FLAG_IMAGE, PAGE_SIZE};
use super::uri::MigrationUri;
use crate::runtime::Shared;
use crate::snapshot::MachineState;

/// What came in: the machine's memory and state, and its disks' and nodes' files, opened.
pub struct Incoming {
    /// Guest memory, filled (not yet registered with KVM).
    pub memory: GuestRam,
    /// The machine's state.
    pub state: MachineState,
    /// The backing files of the disks in their slots, by disk id.
    pub disk_files: BTreeMap<String, File>,
    /// The `blockdev-add` nodes' files, by node name.
    pub node_files: BTreeMap<String, File>,
    /// How to tell the source the outcome.
    pub answer: Answer,
}

/// Tells the source whether the machine was restored.
#[derive(Default)]
pub struct Answer {
    /// The source, over `unix:`: it waits for the destination to say it took the state.
    reply: Option<UnixStream>,
    /// The `exec:` command, reaped once the stream is read.
    child: Option<Child>,
}

impl Answer {
    /// Tells the source the machine was restored (`Ok`), or why not.
    pub fn send(mut self, result: Result<(), &str>) {
        if let Some(s) = &mut self.reply {
            let line = match result {
                Ok(()) => "OK\n".to_string(),
                Err(why) => format!("ERR {}\n", why.replace('\n', " ")),
            };
            let _ = s.write_all(line.as_bytes());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Receives the machine from `uri`; `here` is this machine, `ram` its RAM regions (guest
/// address, size); `defer` delivers `migrate-incoming`'s URI. Emits the `MIGRATION` events and
/// keeps `query-migrate`'s status; a refusal is one line, also told to a `unix:` source.
pub fn receive(
    uri: MigrationUri,
    here: &MachineConfig,
    ram: &[(u64, u64)],
    shared: &Shared,
    defer: &Receiver<MigrationUri>,
) -> Result<Incoming, String> {
    *shared.migration() = MigrationInfo::starting(here.memory);
    let uri = match uri {
        MigrationUri::Defer => wait_for_uri(shared, defer)?,
        uri => uri,
    };
    shared.set_migration_status(Status::Setup);
    let result = receive_from(&uri, here, ram, shared);
    if let Err(e) = &result {
        ended(shared, Err(e));
    }
    result
}

/// The migration in has ended: the machine was restored from it, or not (`Err` says why).
pub fn ended(shared: &Shared, result: Result<(), &str>) {
    shared.migration_ending(result.err());
    shared.set_migration_status(if result.is_ok() {
        Status::Completed
    } else {
        Status::Failed
    });
}

fn wait_for_uri(shared: &Shared, defer: &Receiver<MigrationUri>) -> Result<MigrationUri, String> {
    loop {
        match defer.recv_timeout(Duration::from_millis(100)) {
            Ok(uri) => return Ok(uri),
            Err(RecvTimeoutError::Timeout) if !shared.exit.is_requested() => {}
            _ => return Err("quit while waiting for migrate-incoming".into()),
        }
    }
}

/// Waits for one connection on `path`, giving up if the VM is asked to quit.
fn accept(path: &Path, shared: &Shared) -> Result<UnixStream, String> {
    let name = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {name}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{name}: {e}"))?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if shared.exit.is_requested() {
                    let _ = std::fs::remove_file(path);
                    return Err("quit while waiting for the source".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("{name}: {e}")),
        }
    };
    let _ = std::fs::remove_file(path);
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(stream)
}

fn receive_from(
    uri: &MigrationUri,
    here: &MachineConfig,
    ram: &[(u64, u64)],
    shared: &Shared,
) -> Result<Incoming, String> {
    let setup = Instant::now();
    match uri {
        MigrationUri::Unix(path) => {
            let stream = accept(path, shared)?;
            let reply = stream.try_clone().map_err(|e| e.to_string())?;
            shared.migration().setup_time = Some(setup.elapsed());
            let mut incoming = Some(reply);
            let result = read_stream(
                BufReader::with_capacity(1 << 20, stream),
                here,
                ram,
                shared,
                &mut incoming,
            );
            match result {
                Ok(mut i) => {
                    i.answer.reply = incoming;
                    Ok(i)
                }
                Err(e) => {
                    Answer {
                        reply: incoming,
                        child: None,
                    }
                    .send(Err(&e));
                    Err(e)
                }
            }
        }
        MigrationUri::Exec(command) => {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("exec:{command}: {e}"))?;
            let out = child.stdout.take().ok_or("exec: no standard output")?;
            shared.migration().setup_time = Some(setup.elapsed());
            let mut no_reply = None;
            let result = read_stream(
                BufReader::with_capacity(1 << 20, out),
                here,
                ram,
                shared,
                &mut no_reply,
            );
            match result {
                Ok(mut i) => {
                    i.answer.child = Some(child);
                    Ok(i)
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        }
        MigrationUri::File(path) => {
            let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            shared.migration().setup_time = Some(setup.elapsed());
            let mut no_reply = None;
            read_file(file, here, ram, shared, &mut no_reply)
        }
        MigrationUri::Defer => Err("defer needs migrate-incoming".into()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        StreamError::Malformed(format!("its {what} record cannot be read: {e}")).to_string()
    })
}

fn unexpected(record: [u8; 4], expected: &str) -> String {
    StreamError::Malformed(format!(
        "a {} record where {expected} was expected",
        tag_name(record)
    ))
    .to_string()
}

/// The next record, which must be the JSON record `expected`, parsed.
fn next_json<R: Read, T: serde::de::DeserializeOwned>(
    input: &mut StreamReader<R>,
    expected: [u8; 4],
) -> Result<T, String> {
    let record = input.next_record().map_err(|e| e.to_string())?;
    let name = tag_name(expected);
    if record.tag != expected {
        return Err(unexpected(record.tag, &name));
    }
    parse(
        &input.json_payload(&record).map_err(|e| e.to_string())?,
        &name,
    )
}

/// The header and the `CONF` record: the machine, checked against this one.
fn machine<R: Read>(
    input: &mut StreamReader<R>,
    here: &MachineConfig,
    reply: &mut Option<UnixStream>,
) -> Result<(), String> {
    let source: MachineConfig = next_json(input, tag::CONF)?;
    compat::check(&source, here)?;
    if let Some(r) = reply {
        r.write_all(b"OK\n")
            .map_err(|e| format!("answering the source: {e}"))?;
    }
    Ok(())
}

fn read_stream<R: Read>(
    input: R,
    here: &MachineConfig,
    ram: &[(u64, u64)],
    shared: &Shared,
    reply: &mut Option<UnixStream>,
) -> Result<Incoming, String> {
    let mut input = StreamReader::new(input).map_err(|e| e.to_string())?;
    if input.flags() & FLAG_IMAGE != 0 {
        return Err("a memory image can only be read from a file (file:PATH)".into());
    }
    machine(&mut input, here, reply)?;
    shared.set_migration_status(Status::Active);
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = ram
        .iter()
        .map(|&(g, s)| (vm_memory::GuestAddress(g), s as usize))
        .collect();
    let memory =
        GuestRam::from_ranges(&ranges).map_err(|e| format!("cannot allocate guest memory: {e}"))?;
    let mut stats = PassStats::default();
    let mut state = None;
    loop {
        let record = input.next_record().map_err(|e| e.to_string())?;
        match record.tag {
            tag::MEMR => {
                let s =
                    memory::receive_run(&memory, &mut input, &record).map_err(|e| e.to_string())?;
                stats.normal += s.normal;
                stats.zero += s.zero;
            }
            tag::STAT if state.is_none() => {
                let bytes = input.json_payload(&record).map_err(|e| e.to_string())?;
                state = Some(parse::<MachineState>(&bytes, "STAT")?);
            }
            tag::DONE => {
                input.end(&record).map_err(|e| e.to_string())?;
                break;
            }
            other => return Err(unexpected(other, "MEMR, STAT or DONE")),
        }
    }
    let state =
        state.ok_or_else(|| StreamError::Malformed("it has no STAT record".into()).to_string())?;
    {
        let mut m = shared.migration();
        m.normal_pages = stats.normal;
        m.zero_pages = stats.zero;
        m.transferred = input.bytes_read();
    }
    finish(memory, state)
}

fn read_file(
    file: File,
    here: &MachineConfig,
    ram: &[(u64, u64)],
    shared: &Shared,
    reply: &mut Option<UnixStream>,
) -> Result<Incoming, String> {
    let mut input = StreamReader::new(BufReader::new(&file)).map_err(|e| e.to_string())?;
    if input.flags() & FLAG_IMAGE == 0 {
        // A stream saved to a file (exec:cat > FILE): read it as one.
        drop(input);
        let mut file = file;
        std::io::Seek::rewind(&mut file).map_err(|e| e.to_string())?;
        return read_stream(
            BufReader::with_capacity(1 << 20, file),
            here,
            ram,
            shared,
            reply,
        );
    }
    machine(&mut input, here, reply)?;
    shared.set_migration_status(Status::Active);
    let state: MachineState = next_json(&mut input, tag::STAT)?;
    let layout: ImageLayout = next_json(&mut input, tag::IMAG)?;
    let done = input.next_record().map_err(|e| e.to_string())?;
    if done.tag != tag::DONE {
        return Err(unexpected(done.tag, "DONE"));
    }
    input.end(&done).map_err(|e| e.to_string())?;
    drop(input);
    let memory = memory::map_image(&file, &layout, ram).map_err(|e| e.to_string())?;
    {
        let mut m = shared.migration();
        m.normal_pages = layout.runs.iter().map(|r| r.1).sum::<u64>() / PAGE_SIZE;
        m.transferred = file.metadata().map(|m| m.len()).unwrap_or(0);
    }
    finish(memory, state)
}

/// Opens every backend the state names, checking each is the file the source used.
fn finish(memory: GuestRam, state: MachineState) -> Result<Incoming, String> {
    let mut node_files = BTreeMap::new();
    for (name, node) in &state.hotplug.nodes {
        let file = node.identity.reopen(&node.path, node.readonly)?;
        node_files.insert(name.clone(), file);
    }
    let mut disk_files = BTreeMap::new();
    for d in &state.pci.disks {
        let file = match d.node.as_ref().and_then(|n| node_files.get(n)) {
            Some(f) => f.try_clone().map_err(|e| format!("{}: {e}", d.id))?,
            None => d.identity.reopen(&d.path, d.readonly)?,
        };
        disk_files.insert(d.id.clone(), file);
    }
    Ok(Incoming {
        memory,
        state,
        disk_files,
        node_files,
        answer: Answer::default(),
    })
}
