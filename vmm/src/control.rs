//! What the control socket can do to the machine: the QMP commands the VM answers (SPEC.md §5).
//! The hot-plug commands are [`Hotplug`]'s.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::hotplug::Hotplug;
use crate::pci_devices::PciDevices;
use crate::qmp::{check_args, QmpError, QmpHandler};
use crate::vm::{ExitSignal, VmExit};

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

/// The commands [`MachineControl`] answers.
const COMMANDS: &[&str] = &["query-status", "quit", "query-pci", "query-block"];

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
        COMMANDS
            .iter()
            .chain(Hotplug::COMMANDS)
            .map(|c| c.to_string())
            .collect()
    }
}

impl MachineControl {
    fn run(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(result) = self.hotplug.execute(command, args) {
            return result;
        }
        match command {
            "query-status" => {
                check_args(args, &[])?;
                Ok(json!({"status": "running", "running": true}))
            }
            "quit" => {
                check_args(args, &[])?;
                // Stop once the reply is on its way, as QEMU does: the server disconnects its
                // clients when the VM ends, and a reply still queued would be lost.
                let exit = self.exit.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    exit.request(VmExit::Quit);
                });
                Ok(json!({}))
            }
            "query-pci" => {
                check_args(args, &[])?;
                Ok(self.pci.query_pci())
            }
            "query-block" => {
                check_args(args, &[])?;
                Ok(self.pci.query_block())
            }
            _ => Err(QmpError::command_not_found(command)),
        }
    }
}
