//! What the control socket can do to the machine: the QMP commands the VM answers (SPEC.md §5).
//! The hot-plug commands are carried out by [`Hotplug`].

use std::sync::Arc;

use serde_json::{json, Map, Value};

use devices::hotplug::Command;

use crate::exit::{ExitSignal, VmExit};
use crate::hotplug::{self, Hotplug};
use crate::pci_devices::PciDevices;
use crate::qmp::typed::{parse_args, NoArgs};
use crate::qmp::{QmpError, QmpHandler};

/// The machine's side of the control socket.
pub struct MachineControl {
    exit: Arc<ExitSignal>,
    pci: Arc<PciDevices>,
    hotplug: Arc<Hotplug>,
}

impl MachineControl {
    /// Commands for the VM that stops through `exit`, has the PCI devices `pci` and hot-plugs
    /// through `hotplug`.
    pub fn new(exit: Arc<ExitSignal>, pci: Arc<PciDevices>, hotplug: Arc<Hotplug>) -> Self {
        MachineControl { exit, pci, hotplug }
    }
}

/// A control-socket request, its arguments typed.
enum Request {
    QueryStatus,
    Quit,
    QueryPci,
    QueryBlock,
    QueryHotplug,
    Hotplug(Command),
}

/// How a command's arguments become a [`Request`].
type Parse = fn(&Map<String, Value>) -> Result<Request, QmpError>;

/// Every command the machine answers (SPEC.md §5), with the parser of its arguments: the one
/// list of their names, which `query-commands` reports too.
const COMMANDS: &[(&str, Parse)] = &[
    ("query-status", |a| no_args(a, Request::QueryStatus)),
    ("quit", |a| no_args(a, Request::Quit)),
    ("query-pci", |a| no_args(a, Request::QueryPci)),
    ("query-block", |a| no_args(a, Request::QueryBlock)),
    ("x-query-hotplug", |a| no_args(a, Request::QueryHotplug)),
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
            Request::QueryStatus => Ok(json!({"status": "running", "running": true})),
            Request::Quit => {
                // Stop once the reply is on its way, as QEMU does: the server disconnects its
                // clients when the VM ends, and a reply still queued would be lost.
                let exit = self.exit.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    exit.request(VmExit::Quit);
                });
                Ok(json!({}))
            }
            Request::QueryPci => Ok(self.pci.query_pci()),
            Request::QueryBlock => Ok(self.pci.query_block()),
            Request::QueryHotplug => Ok(self.hotplug.query()),
            Request::Hotplug(command) => self.hotplug.run(command),
        }
    }
}
