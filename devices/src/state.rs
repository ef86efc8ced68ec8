//! Saving and restoring device models (snapshots and live migration).
//!
//! Every model that holds guest-visible state has a `state()` that returns it as a plain,
//! serializable value (`serde`), and a `restore()` that puts it back into a model built the same
//! way (same identity, same capabilities, same sizes). What a model is built from — its identity,
//! register masks, capabilities, queue counts — is not in its state: the VMM builds the same
//! machine again and restores into it, and `restore()` refuses a state that does not fit the model
//! (a different device, a different number of buses or vectors), changing nothing.
//!
//! Interrupt routes, mappings and threads are not state either: a model whose restored state
//! implies them sets them up again through the interfaces it was built with (an MSI-X table
//! re-programs its vectors' routes, for example).

/// A saved state that does not fit the model it is restored into. The model is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{model}: {reason}")]
pub struct StateError {
    /// The model, as its logs name it (e.g. "rp1", "virtio-blk d1", "MSI-X").
    pub model: String,
    /// What does not fit.
    pub reason: String,
}

impl StateError {
    /// `model` cannot take the state because of `reason`.
    pub fn new(model: impl Into<String>, reason: impl Into<String>) -> Self {
        StateError {
            model: model.into(),
            reason: reason.into(),
        }
    }
}

/// `Err` naming `what` unless `saved == built`: a saved value that must equal the one the model
/// was built with.
pub(crate) fn expect_same<T: PartialEq + std::fmt::Debug>(
    model: &str,
    what: &str,
    saved: T,
    built: T,
) -> Result<(), StateError> {
    if saved == built {
        Ok(())
    } else {
        Err(StateError::new(
            model,
            format!("saved {what} {saved:?} does not match this machine's {built:?}"),
        ))
    }
}
