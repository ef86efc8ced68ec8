//! The control socket (SPEC.md §5): a QMP-compatible server that clients written for QEMU, such
//! as the Python package `qemu.qmp`, use unchanged.
//!
//! [`protocol`] is the I/O-free part (framing, validation, replies, events, argument helpers);
//! [`server`] serves it on a Unix socket to several clients at once. The VM plugs in through
//! [`QmpHandler`], which runs every command the server does not answer itself
//! (`qmp_capabilities`, `query-version`, `query-commands`), and sends events with
//! [`QmpServer::emit`] or a [`QmpEvents`] handle.

// The argument helpers, error classes and event handles serve the hotplug commands
// (device_add, device_del, blockdev-*) and events (DEVICE_DELETED) that are wired next; until
// then only tests use some of them.
#![allow(dead_code, unused_imports)]

pub mod protocol;
pub mod server;

pub use protocol::{
    arg_bool, arg_obj, arg_opt_bool, arg_opt_obj, arg_opt_str, arg_opt_u64, arg_str, arg_u64,
    check_args, ErrorClass, QmpError, QmpHandler,
};
pub use server::{QmpEvents, QmpServer};
