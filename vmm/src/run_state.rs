//! The VM's run state as the control socket reports it (`query-status`) and the rules that move
//! it: `stop` and `cont`, a migration out of the VM, a migration into it. Pure: it decides what
//! to do — pause or resume the vCPUs, which events to send — and the VMM does it.
//!
//! The states and their names are QEMU's (`RunState` in its QAPI schema), so that management
//! software written for QEMU reads them unchanged:
//!
//! | state            | vCPUs   | how it is entered                                        |
//! | ---------------- | ------- | -------------------------------------------------------- |
//! | `running`        | run     | boot, `cont`, a migration in ending with autostart       |
//! | `paused`         | stopped | `stop`, `--paused` (`-S`), a migration in ending without |
//! | `inmigrate`      | stopped | `--incoming`, until the migration in ends                |
//! | `finish-migrate` | stopped | a migration out pausing the VM to send the last state    |
//! | `postmigrate`    | stopped | a migration out that completed; `cont` runs the VM again |
//!
//! A migration that fails or is cancelled leaves the VM in the state it had when it started.
//! While a migration comes in, `cont` and `stop` only say whether the VM runs once it has
//! come in (QEMU's "autostart"); it starts with the run state the source had when its
//! migration started, unless `--paused` was given.

/// A run state (QEMU's names, see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Stopped by the user.
    Paused,
    /// A migration is coming in.
    InMigrate,
    /// A migration out is sending the last state; the vCPUs are stopped.
    FinishMigrate,
    /// A migration out completed.
    PostMigrate,
}

impl RunState {
    /// The name `query-status` reports.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }
}

/// What the VMM is to do about a transition, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Stop the vCPUs (and the devices' I/O), then send `STOP`.
    Pause,
    /// Start the vCPUs (and the devices' I/O), then send `RESUME`.
    Resume,
}

/// Why a transition is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunStateError {
    /// A migration out is already under way.
    #[error("There's a migration process in progress")]
    MigrationActive,
    /// The VM is being migrated in.
    #[error("Guest is waiting for an incoming migration")]
    Incoming,
}

/// The run state and the migrations under way. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStates {
    state: RunState,
    /// A migration in: whether the VM runs once it has come in.
    autostart: bool,
    /// A migration out: whether the VM ran when it started.
    migrating_out: Option<bool>,
}

impl RunStates {
    /// A VM that boots running, or paused (`--paused`).
    pub fn booting(paused: bool) -> Self {
        RunStates {
            state: if paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            autostart: false,
            migrating_out: None,
        }
    }

    /// A VM waiting for a migration in; it will run once it has come in unless `paused`.
    pub fn incoming(paused: bool) -> Self {
        RunStates {
            state: RunState::InMigrate,
            autostart: !paused,
            migrating_out: None,
        }
    }

    /// The state now.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Whether the vCPUs run.
    pub fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    /// Whether a migration out is under way.
    pub fn is_migrating(&self) -> bool {
        self.migrating_out.is_some() || self.state == RunState::InMigrate
    }

    /// `stop`.
    pub fn stop(&mut self) -> Option<Effect> {
        match self.state {
            RunState::Running => {
                self.state = RunState::Paused;
                Some(Effect::Pause)
            }
            RunState::InMigrate => {
                self.autostart = false;
                None
            }
            // While a migration out runs, the VM stays stopped after it fails.
            RunState::FinishMigrate => {
                self.migrating_out = Some(false);
                None
            }
            RunState::Paused | RunState::PostMigrate => None,
        }
    }

    /// `cont`. Refused while a migration out is sending its last state.
    pub fn cont(&mut self) -> Result<Option<Effect>, RunStateError> {
        match self.state {
            RunState::Paused | RunState::PostMigrate => {
                self.state = RunState::Running;
                Ok(Some(Effect::Resume))
            }
            RunState::InMigrate => {
                self.autostart = true;
                Ok(None)
            }
            RunState::FinishMigrate => Err(RunStateError::MigrationActive),
            RunState::Running => Ok(None),
        }
    }

    /// A migration out starts (`migrate`). Refused while one runs or one comes in.
    pub fn start_migration(&mut self) -> Result<(), RunStateError> {
        if self.migrating_out.is_some() {
            return Err(RunStateError::MigrationActive);
        }
        if self.state == RunState::InMigrate {
            return Err(RunStateError::Incoming);
        }
        self.migrating_out = Some(self.is_running());
        Ok(())
    }

    /// Whether the VM ran when the migration out under way started: the run state its
    /// destination takes on.
    pub fn ran_when_migration_started(&self) -> bool {
        self.migrating_out.unwrap_or(self.is_running())
    }

    /// The migration out stops the VM to send its last state.
    pub fn finish_migration(&mut self) -> Option<Effect> {
        let effect = self.is_running().then_some(Effect::Pause);
        self.state = RunState::FinishMigrate;
        effect
    }

    /// The migration out has ended: completed (the VM stays stopped, `postmigrate`), or failed
    /// or cancelled (the VM runs again if it ran when the migration started).
    pub fn end_migration(&mut self, completed: bool) -> Option<Effect> {
        let ran = self.migrating_out.take().unwrap_or(false);
        if completed {
            let effect = self.is_running().then_some(Effect::Pause);
            self.state = RunState::PostMigrate;
            return effect;
        }
        match (ran, self.is_running()) {
            (true, false) => {
                self.state = RunState::Running;
                Some(Effect::Resume)
            }
            (true, true) => None,
            (false, running) => {
                self.state = RunState::Paused;
                running.then_some(Effect::Pause)
            }
        }
    }

    /// The migration in has ended: the VM runs if autostart says so (the source ran, and
    /// neither `--paused` nor `stop` said otherwise).
    pub fn incoming_done(&mut self, source_ran: bool) -> Option<Effect> {
        if self.state != RunState::InMigrate {
            return None;
        }
        if self.autostart && source_ran {
            self.state = RunState::Running;
            Some(Effect::Resume)
        } else {
            self.state = RunState::Paused;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_cont() {
        let mut s = RunStates::booting(false);
        assert_eq!(s.state().name(), "running");
        assert_eq!(s.stop(), Some(Effect::Pause));
        assert_eq!(s.stop(), None, "stopping twice does nothing");
        assert_eq!(s.state(), RunState::Paused);
        assert_eq!(s.cont(), Ok(Some(Effect::Resume)));
        assert_eq!(s.cont(), Ok(None));
        assert_eq!(RunStates::booting(true).state(), RunState::Paused);
    }

    #[test]
    fn a_completed_migration_leaves_the_source_stopped_in_postmigrate() {
        let mut s = RunStates::booting(false);
        s.start_migration().unwrap();
        assert!(s.is_migrating());
        assert_eq!(s.start_migration(), Err(RunStateError::MigrationActive));
        assert!(s.ran_when_migration_started());
        assert_eq!(s.finish_migration(), Some(Effect::Pause));
        assert_eq!(s.state().name(), "finish-migrate");
        assert_eq!(s.cont(), Err(RunStateError::MigrationActive));
        assert_eq!(s.end_migration(true), None);
        assert_eq!(s.state().name(), "postmigrate");
        assert!(!s.is_migrating());
        // cont runs the source again, as in QEMU.
        assert_eq!(s.cont(), Ok(Some(Effect::Resume)));
    }

    #[test]
    fn a_failed_migration_restores_the_state_it_started_from() {
        let mut s = RunStates::booting(false);
        s.start_migration().unwrap();
        s.finish_migration();
        assert_eq!(s.end_migration(false), Some(Effect::Resume));
        assert!(s.is_running());

        // Failing before the last stage: the VM never stopped.
        let mut s = RunStates::booting(false);
        s.start_migration().unwrap();
        assert_eq!(s.end_migration(false), None);
        assert!(s.is_running());

        // A VM paused before the migration stays paused, and its destination will be too.
        let mut s = RunStates::booting(false);
        s.stop();
        s.start_migration().unwrap();
        assert!(!s.ran_when_migration_started());
        assert_eq!(s.finish_migration(), None);
        assert_eq!(s.end_migration(false), None);
        assert_eq!(s.state(), RunState::Paused);

        // Stopped by the user during the last stage: paused afterwards.
        let mut s = RunStates::booting(false);
        s.start_migration().unwrap();
        s.finish_migration();
        s.stop();
        assert_eq!(s.end_migration(false), None);
        assert_eq!(s.state(), RunState::Paused);
    }

    #[test]
    fn an_incoming_vm_takes_on_the_source_run_state_unless_told_otherwise() {
        let mut s = RunStates::incoming(false);
        assert_eq!(s.state().name(), "inmigrate");
        assert_eq!(s.start_migration(), Err(RunStateError::Incoming));
        assert_eq!(s.incoming_done(true), Some(Effect::Resume));
        assert!(s.is_running());

        let mut s = RunStates::incoming(false);
        assert_eq!(s.incoming_done(false), None);
        assert_eq!(s.state(), RunState::Paused);

        let mut s = RunStates::incoming(true);
        assert_eq!(s.incoming_done(true), None, "--paused");
        assert_eq!(s.state(), RunState::Paused);

        // stop and cont during the migration in decide it, as QEMU's autostart.
        let mut s = RunStates::incoming(false);
        assert_eq!(s.stop(), None);
        assert_eq!(s.incoming_done(true), None);
        let mut s = RunStates::incoming(true);
        assert_eq!(s.cont(), Ok(None));
        assert_eq!(s.incoming_done(true), Some(Effect::Resume));
    }
}
