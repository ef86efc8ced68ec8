//! The control socket (SPEC.md §5): a QMP-compatible server that clients written for QEMU, such
//! as the Python package `qemu.qmp`, use unchanged.
//!
//! [`protocol`] is the I/O-free part (framing, validation, replies, events, argument helpers);
//! [`server`] serves it on a Unix socket to several clients at once. The VM plugs in through
//! [`QmpHandler`], which runs every command the server does not answer itself
//! (`qmp_capabilities`, `query-version`, `query-commands`), and sends events with
//! [`QmpServer::emit`] or a [`QmpEvents`] handle.

// Part of the protocol toolkit (integer and object argument helpers, the DeviceNotActive class,
// the server's own accessors) serves no command of this VM yet; its unit tests use it.
#![allow(dead_code)]

pub mod protocol;
pub mod server;

pub use protocol::{arg_obj, arg_opt_bool, arg_opt_str, arg_str, check_args, QmpError, QmpHandler};
pub use server::{QmpEvents, QmpServer};
