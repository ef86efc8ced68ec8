//! Raw mode for the host terminal while the guest owns the console.

use std::io::IsTerminal;

use vmm_sys_util::terminal::Terminal;

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// Puts stdin in raw mode for as long as it lives, if stdin is a terminal.
pub struct RawMode(bool);

impl RawMode {
    /// Raw mode on (a no-op when stdin is not a terminal).
    pub fn enter() -> RawMode {
        let on = stdin_is_tty() && std::io::stdin().lock().set_raw_mode().is_ok();
        RawMode(on)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}
