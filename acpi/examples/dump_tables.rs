//! Builds the ACPI tables for a sample machine (2 vCPUs, default host bridge,
//! `_OSC` granting native hotplug and reporting to ports 0x610..0x618) and
//! writes each table as `<SIG>.dat` (`RSDP.dat`, `XSDT.dat`, `FACP.dat`,
//! `APIC.dat`, `MCFG.dat`, `DSDT.dat`) into the directory given as argument,
//! ready for `iasl -d`.
//!
//! ```text
//! cargo run -p hotplug-vmm-acpi --example dump_tables -- /tmp/tables
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use hotplug_vmm_acpi::{build_tables, table_name, MachineConfig, DEFAULT_TABLES_BASE};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: dump_tables OUTPUT_DIR");
        return ExitCode::FAILURE;
    };
    let cfg = MachineConfig {
        cpus: 2,
        ..Default::default()
    };
    let tables = match build_tables(&cfg, DEFAULT_TABLES_BASE) {
        Ok(tables) => tables,
        Err(e) => {
            eprintln!("dump_tables: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("dump_tables: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (addr, blob) in &tables {
        let path = dir.join(format!("{}.dat", table_name(blob)));
        if let Err(e) = std::fs::write(&path, blob) {
            eprintln!("dump_tables: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{addr:#010x} {:5} bytes {}", blob.len(), path.display());
    }
    ExitCode::SUCCESS
}
