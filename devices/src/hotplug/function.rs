//! One hot-pluggable function as the control plane keeps it: where it sits, what backs it, and
//! the one [`Lifecycle`] state it is in.
//!
//! ```text
//!              device_del                     guest powers the slot off (native)
//!   Present ───────────────▶ UnplugRequested ──────────────────────────────▶ PoweredOff
//!      │  ◀── guest powers on again ───────────────────────────────────────────┘   │
//!      │                          │ guest's _EJ0 (ACPI)                              │ indicator off,
//!      │                          ▼                                                  │ or 3 s
//!      │                       released ◀──────────────────────────────────────────┘
//!      │ x-surprise-remove (any state before released)
//!      ▼
//!    Pulled ──── driver resets the device, slot reused, BAR mapped over it ────▶ released
//! ```
//!
//! A released function is no longer kept. A pulled one is no longer *attached*: its id is free
//! and `DEVICE_DELETED` has been sent, but its device may still be failing its driver's
//! requests until that driver resets it.

use std::path::PathBuf;
use std::time::Duration;

use super::policy::SurprisePolicy;
use super::topology::SlotId;

/// Identifies one function for the whole of its life: ids are reused, keys never.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FunctionKey(pub u64);

/// What a function's block device reads and writes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backing {
    /// The `blockdev-add` node it uses; `None` for a disk given on the command line.
    pub node: Option<String>,
    /// The image.
    pub path: PathBuf,
    /// Whether the guest may write.
    pub readonly: bool,
}

/// A removal the guest was asked for (`device_del`) and has not finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnplugRequest {
    /// When the first request was made.
    pub since: Duration,
    /// When the last button press or eject request was made.
    pub last_request: Duration,
    /// Presses (native) or eject requests (ACPI) made so far.
    pub requests: u32,
    /// `X_UNPLUG_STALLED` has been sent for it.
    pub stall_reported: bool,
    /// Native: when to check that the guest took the press (set when the guest finished
    /// enabling the slot while the request was pending).
    pub recheck_at: Option<Duration>,
    /// ACPI: how often the guest's event method had read the bus when the request was made
    /// (to tell "never looked" from "looked and did not eject").
    pub serviced_at_request: u64,
}

/// Where a function is in its life.
///
/// ```text
///              device_del                     guest powers the slot off (native)
///   Present ───────────────▶ UnplugRequested ──────────────────────────────▶ PoweredOff
///      │  ◀── guest powers on again ───────────────────────────────────────────┘   │
///      │                          │ guest's _EJ0 (ACPI)                              │ indicator off,
///      │                          ▼                                                  │ or 3 s
///      │                       released ◀──────────────────────────────────────────┘
///      │ x-surprise-remove (any state before released)
///      ▼
///    Pulled ──── driver resets the device, slot reused, BAR mapped over it ────▶ released
/// ```
///
/// A released function is no longer kept. A pulled one is no longer *attached*: its id is
/// free and `DEVICE_DELETED` has been sent, but its device may still be failing its driver's
/// requests until that driver resets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Lifecycle {
    /// In its slot, in use by the guest.
    Present,
    /// The guest was asked to let go of it.
    UnplugRequested(UnplugRequest),
    /// Native slot: the guest powered the slot off at `since`; the card is released when the
    /// guest turns the power indicator off, or after a while without that.
    PoweredOff {
        /// When the guest powered the slot off.
        since: Duration,
        /// The removal request it answered, if there was one.
        request: Option<UnplugRequest>,
    },
    /// Pulled out without asking the guest (surprise removal) at `since`; the device may still
    /// be failing its driver's requests.
    Pulled {
        /// What the removal did with the requests in flight and the BARs.
        policy: SurprisePolicy,
        /// When it was pulled.
        since: Duration,
    },
}

/// One function: where it sits, what backs it, and its [`Lifecycle`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Function {
    /// Its key.
    pub key: FunctionKey,
    /// Its id on the control socket (`device_add`'s `id`).
    pub id: String,
    /// The slot it occupies (or occupied, when pulled).
    pub slot: SlotId,
    /// What backs it.
    pub backing: Backing,
    /// A failing backend pulls it out of the guest instead of only being reported.
    pub remove_on_backend_error: bool,
    /// Its backend's failure was reported (once per function).
    pub backend_error_reported: bool,
    /// Where it is in its life.
    pub lifecycle: Lifecycle,
}

impl Function {
    /// Whether it is still in its slot as the control socket sees it (not pulled).
    pub fn is_attached(&self) -> bool {
        !matches!(self.lifecycle, Lifecycle::Pulled { .. })
    }

    /// The removal request the guest has not finished, if any.
    pub fn request(&self) -> Option<&UnplugRequest> {
        match &self.lifecycle {
            Lifecycle::UnplugRequested(r) => Some(r),
            Lifecycle::PoweredOff { request, .. } => request.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn request_mut(&mut self) -> Option<&mut UnplugRequest> {
        match &mut self.lifecycle {
            Lifecycle::UnplugRequested(r) => Some(r),
            Lifecycle::PoweredOff { request, .. } => request.as_mut(),
            _ => None,
        }
    }
}
