//! The control socket (SPEC.md §5): a QMP-compatible server that clients written for QEMU, such
//! as the Python package `qemu.qmp`, use unchanged.
//!
//! [`protocol`] is the I/O-free part (framing, validation, replies, events, argument helpers);
//! [`server`] serves it on a Unix socket to several clients at once. The VM plugs in through
//! [`QmpHandler`], which runs every command the server does not answer itself
//! (`qmp_capabilities`, `query-version`, `query-commands`), and sends events with
//! a [`QmpEvents`] handle.

pub mod protocol;
pub mod server;
pub mod typed;

pub use protocol::{QmpError, QmpHandler};
pub use server::{QmpEvents, QmpServer};
