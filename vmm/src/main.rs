//! hotplug-vmm: a minimal x86_64 VMM on KVM for PCI Express hotplug research.

mod backend_identity;
mod boot;
mod config;
mod console;
mod control;
mod exit;
mod hotplug;
mod interrupts;
mod layout;
mod memory_slots;
mod migration;
mod mptable;
mod pci_devices;
mod qmp;
mod run_state;
mod runtime;
mod snapshot;
mod terminal;
mod trace;
mod vcpu;
mod vcpu_state;
mod vm;

use clap::Parser;

/// When the process started, for reporting how long a restore took.
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() {
    STARTED.get_or_init(std::time::Instant::now);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        // Milliseconds: log lines are read next to the guest's dmesg and the hot-plug trace.
        .format_timestamp_millis()
        .init();
    let cli = config::Cli::parse();
    let raw = (cli.serial == config::SerialMode::Stdio).then(terminal::RawMode::enter);
    let result = vm::run(&cli);
    drop(raw);
    let code = match result {
        Ok(exit::VmExit::PowerOff) => {
            log::info!("guest powered off");
            0
        }
        Ok(exit::VmExit::Reset) => {
            log::info!("guest reset: ending (hotplug-vmm does not restart guests)");
            0
        }
        Ok(exit::VmExit::Quit) => 0,
        Ok(exit::VmExit::Fatal(msg)) => {
            eprintln!("hotplug-vmm: {msg}");
            1
        }
        Err(e) => {
            eprintln!("hotplug-vmm: {e}");
            1
        }
    };
    std::process::exit(code);
}
