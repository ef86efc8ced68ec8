//! Every integration test that boots a real guest, in one test binary.
//!
//! Boots are slow on PVM hosts and the suite runs two tests at a time (`--test-threads=2`, one
//! per core). One binary per file ran them in rounds, each ending with a core idle while that
//! file's longest test (50 hot-plug cycles on one kernel) finished; in one binary the scheduler
//! keeps both cores busy to the end. `cargo test --test guest osc::` runs one file's tests.

mod common;

mod acpi_hotplug;
mod backend;
mod boot;
mod cycles;
mod datapath;
mod hostile;
mod hotplug;
mod osc;
mod qmp;
mod snapshot;
mod soak;
mod surprise;
