//! Snapshots and migration (docs/snapshot-format.md, docs/migration.md): the stream format,
//! guest memory in and out of it, the check that a machine fits, and the migrations out of
//! (`migrate`) and into (`--incoming`) a VM.

pub mod compat;
pub mod dirty;
pub mod incoming;
pub mod memory;
pub mod outgoing;
pub mod status;
pub mod stream;
pub mod uri;
