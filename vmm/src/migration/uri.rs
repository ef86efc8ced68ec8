//! Where a migration goes to or comes from, as QEMU's `migrate` and `-incoming` spell it.

use std::fmt;
use std::path::PathBuf;

/// A migration URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUri {
    /// `unix:PATH`: a Unix socket; the destination listens, the source connects. Both sides
    /// talk back (the destination refuses a machine unlike its own before any memory is sent),
    /// and the source sends memory while the guest runs (live migration).
    Unix(PathBuf),
    /// `exec:COMMAND`: `sh -c COMMAND`, the stream on its standard input (out) or output (in).
    Exec(String),
    /// `file:PATH`: a file, written with guest memory as an image the destination maps.
    File(PathBuf),
    /// `defer` (incoming only): wait for `migrate-incoming` to say.
    Defer,
}

impl MigrationUri {
    /// Parses `uri`; `defer` only if `allow_defer`.
    pub fn parse(uri: &str, allow_defer: bool) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid migration URI '{uri}': use unix:PATH, exec:COMMAND or file:PATH{}",
                if allow_defer { ", or defer" } else { "" }
            )
        };
        if uri == "defer" {
            return if allow_defer {
                Ok(MigrationUri::Defer)
            } else {
                Err(bad())
            };
        }
        let (scheme, rest) = uri.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "unix" => Ok(MigrationUri::Unix(rest.into())),
            "exec" => Ok(MigrationUri::Exec(rest.into())),
            "file" => Ok(MigrationUri::File(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
            MigrationUri::Defer => f.write_str("defer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_transports_and_defer() {
        assert_eq!(
            MigrationUri::parse("unix:/tmp/m.sock", false),
            Ok(MigrationUri::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            MigrationUri::parse("exec:cat > /tmp/x", false),
            Ok(MigrationUri::Exec("cat > /tmp/x".into()))
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/s", false),
            Ok(MigrationUri::File("/tmp/s".into()))
        );
        assert_eq!(MigrationUri::parse("defer", true), Ok(MigrationUri::Defer));
        for bad in ["defer", "tcp:1.2.3.4:5", "unix:", "file", "", "exec:"] {
            let e = MigrationUri::parse(bad, false).unwrap_err();
            assert!(
                e.contains("unix:PATH, exec:COMMAND or file:PATH"),
                "{bad}: {e}"
            );
        }
        let uri = MigrationUri::parse("exec:cat", false).unwrap();
        assert_eq!(uri.to_string(), "exec:cat");
    }
}
