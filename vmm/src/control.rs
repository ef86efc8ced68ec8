//! What the control socket can do to the machine: the QMP commands the VM answers (SPEC.md §5).
//! The hot-plug commands are carried out by [`Hotplug`](crate::hotplug::Hotplug), the run state
//! and migrations by [`Runtime`] and [`crate::migration`].
//!
//! The control socket is up before the machine exists when a migration comes in: until then
//! it answers `query-status` ("inmigrate"), `query-migrate`, `migrate-incoming` (after
//! `--incoming defer`), `stop` and `cont` (whether the guest runs once it has come in) and
//! `quit`, and refuses the rest.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use devices::hotplug::Command;

use crate::exit::VmExit;
use crate::hotplug;
use crate::migration::outgoing;
use crate::migration::uri::MigrationUri;
use crate::qmp::typed::{parse_args, NoArgs};
use crate::qmp::{QmpError, QmpHandler};
use crate::runtime::{Runtime, Shared};

/// The machine's side of the control socket.
pub struct MachineControl {
    shared: Arc<Shared>,
    runtime: OnceLock<Arc<Runtime>>,
    /// `--incoming defer`: where `migrate-incoming`'s URI goes (taken by the first one).
    incoming: Mutex<Option<Sender<MigrationUri>>>,
}

impl MachineControl {
    /// Commands for a VM whose machine is not built yet; [`attach`](Self::attach) gives it.
    /// `incoming` receives `migrate-incoming`'s URI, if the VM waits for one.
    pub fn new(shared: Arc<Shared>, incoming: Option<Sender<MigrationUri>>) -> Self {
        MachineControl {
            shared,
            runtime: OnceLock::new(),
            incoming: Mutex::new(incoming),
        }
    }

    /// The machine, built.
    pub fn attach(&self, runtime: Arc<Runtime>) {
        let _ = self.runtime.set(runtime);
    }

    fn runtime(&self) -> Result<&Arc<Runtime>, QmpError> {
        self.runtime
            .get()
            .ok_or_else(|| QmpError::generic("Guest is waiting for an incoming migration"))
    }
}

/// `migrate`'s arguments (QEMU's, the ones this VMM uses; `detach` is accepted and ignored:
/// the command never waits).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateArgs {
    uri: String,
    #[serde(default)]
    detach: bool,
}

/// `migrate-incoming`'s arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UriArgs {
    uri: String,
}

/// A control-socket request, its arguments typed.
enum Request {
    QueryStatus,
    Quit,
    Stop,
    Cont,
    Migrate(MigrationUri),
    QueryMigrate,
    MigrateCancel,
    MigrateIncoming(MigrationUri),
    QueryPci,
    QueryBlock,
    QueryHotplug,
    QueryGuestLog,
    Hotplug(Command),
}

/// How a command's arguments become a [`Request`].
type Parse = fn(&Map<String, Value>) -> Result<Request, QmpError>;

fn uri(uri: &str, allow_defer: bool) -> Result<MigrationUri, QmpError> {
    MigrationUri::parse(uri, allow_defer).map_err(QmpError::generic)
}

/// Every command the machine answers (SPEC.md §5), with the parser of its arguments: the one
/// list of their names, which `query-commands` reports too.
const COMMANDS: &[(&str, Parse)] = &[
    ("query-status", |a| no_args(a, Request::QueryStatus)),
    ("quit", |a| no_args(a, Request::Quit)),
    ("stop", |a| no_args(a, Request::Stop)),
    ("cont", |a| no_args(a, Request::Cont)),
    ("migrate", |a| {
        let args: MigrateArgs = parse_args(a)?;
        let _ = args.detach;
        uri(&args.uri, false).map(Request::Migrate)
    }),
    ("query-migrate", |a| no_args(a, Request::QueryMigrate)),
    ("migrate_cancel", |a| no_args(a, Request::MigrateCancel)),
    ("migrate-incoming", |a| {
        let args: UriArgs = parse_args(a)?;
        uri(&args.uri, false).map(Request::MigrateIncoming)
    }),
    ("query-pci", |a| no_args(a, Request::QueryPci)),
    ("query-block", |a| no_args(a, Request::QueryBlock)),
    ("x-query-hotplug", |a| no_args(a, Request::QueryHotplug)),
    ("x-query-guest-log", |a| no_args(a, Request::QueryGuestLog)),
    ("blockdev-add", |a| {
        hotplug::blockdev_add_command(a).map(Request::Hotplug)
    }),
    ("blockdev-del", |a| {
        hotplug::blockdev_del_command(a).map(Request::Hotplug)
    }),
    ("device_add", |a| {
        hotplug::device_add_command(a).map(Request::Hotplug)
    }),
    ("device_del", |a| {
        hotplug::device_del_command(a).map(Request::Hotplug)
    }),
    ("x-surprise-remove", |a| {
        hotplug::surprise_remove_command(a).map(Request::Hotplug)
    }),
];

fn no_args(args: &Map<String, Value>, request: Request) -> Result<Request, QmpError> {
    parse_args::<NoArgs>(args).map(|_| request)
}

impl QmpHandler for MachineControl {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if !crate::trace::enabled() {
            return self.run(command, args);
        }
        crate::trace::record(
            "qmp-request",
            json!({"command": command, "arguments": args}),
        );
        let result = self.run(command, args);
        let outcome = match &result {
            Ok(_) => json!({"command": command, "ok": true}),
            Err(e) => json!({"command": command, "ok": false, "error": e.desc}),
        };
        crate::trace::record("qmp-reply", outcome);
        result
    }

    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|(name, _)| name.to_string()).collect()
    }
}

impl MachineControl {
    fn run(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let (_, parse) = COMMANDS
            .iter()
            .find(|(name, _)| *name == command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        match parse(args)? {
            Request::QueryStatus => Ok(self.shared.query_status()),
            Request::Quit => {
                // Stop once the reply is on its way, as QEMU does: the server disconnects its
                // clients when the VM ends, and a reply still queued would be lost.
                let exit = self.shared.exit.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    exit.request(VmExit::Quit);
                });
                Ok(json!({}))
            }
            Request::Stop => {
                match self.runtime.get() {
                    Some(rt) => rt.stop(),
                    None => {
                        self.shared.run().stop();
                    }
                }
                Ok(json!({}))
            }
            Request::Cont => {
                match self.runtime.get() {
                    Some(rt) => rt.cont(),
                    None => self.shared.run().cont().map(|_| ()),
                }
                .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Request::Migrate(uri) => {
                let rt = self.runtime()?.clone();
                outgoing::start(rt, uri).map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Request::QueryMigrate => Ok(self.shared.migration().to_json()),
            Request::MigrateCancel => {
                // A migration coming in is not cancelled: there is no machine to go back to.
                if self.runtime.get().is_some() {
                    self.shared.cancel_migration();
                }
                Ok(json!({}))
            }
            Request::MigrateIncoming(uri) => {
                let sender = self
                    .incoming
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| {
                        QmpError::generic(
                            "'-incoming' was not specified on the command line with 'defer', or migrate-incoming was already given",
                        )
                    })?;
                let _ = sender.send(uri);
                Ok(json!({}))
            }
            Request::QueryPci => Ok(self.runtime()?.pci.query_pci()),
            Request::QueryBlock => Ok(self.runtime()?.pci.query_block()),
            Request::QueryHotplug => Ok(self.runtime()?.hotplug.query()),
            Request::QueryGuestLog => Ok(guest_log()),
            Request::Hotplug(command) => {
                let rt = self.runtime()?;
                if self.shared.run().is_migrating() && changes_the_machine(&command) {
                    return Err(QmpError::generic(format!(
                        "'{}' is not allowed while a migration is running",
                        command_name(&command)
                    )));
                }
                rt.hotplug.run(command)
            }
        }
    }
}

/// `x-query-guest-log`: every kind of complaint the guest caused, with how many times and how
/// many of them were left out of the log (devices::guest_log).
fn guest_log() -> Value {
    devices::guest_log::counts()
        .into_iter()
        .map(|c| json!({"kind": c.kind, "count": c.total, "suppressed": c.suppressed}))
        .collect()
}

/// Whether a hot-plug command adds or removes a device or a backend a migration carries:
/// refused during one. `blockdev-add` is not: a node added meanwhile travels in the final
/// state.
fn changes_the_machine(command: &Command) -> bool {
    !matches!(command, Command::BlockdevAdd { .. })
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::BlockdevAdd { .. } => "blockdev-add",
        Command::BlockdevDel { .. } => "blockdev-del",
        Command::DeviceAdd(_) => "device_add",
        Command::DeviceDel { .. } => "device_del",
        Command::SurpriseRemove { .. } => "x-surprise-remove",
    }
}
