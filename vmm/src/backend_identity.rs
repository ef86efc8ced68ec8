//! Which file a disk's backend is: a snapshot or migration is restored only onto the file the
//! source used — not a file that replaced it under the same name, not one resized since.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which file a backend is, and how big: a snapshot is restored only onto the same file, not
/// one that replaced it under the same name, and not resized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendIdentity {
    /// Device of the file system holding it.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
}

impl BackendIdentity {
    /// The identity of `file`.
    pub fn of(file: &std::fs::File) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&file.metadata()?))
    }

    /// The identity of an opened image's file.
    pub fn of_disk(disk: &devices::virtio::block::Disk) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&disk.metadata()?))
    }

    /// The identity of the file at `path` now.
    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    fn from_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        BackendIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
        }
    }

    /// Opens `path` (read-write unless `readonly`) if it is still the file this identity
    /// names, with the same size; otherwise says how it changed.
    pub fn reopen(&self, path: &Path, readonly: bool) -> Result<std::fs::File, String> {
        let name = path.display();
        let file =
            devices::virtio::block::open_image(path, readonly).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!("backing file {name} is missing"),
                _ => format!("cannot open backing file {name}: {e}"),
            })?;
        let now = Self::of(&file).map_err(|e| format!("backing file {name}: {e}"))?;
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(format!(
                "backing file {name} was replaced: it is not the file the source used"
            ));
        }
        if now.size != self.size {
            return Err(format!(
                "backing file {name} was resized: {} bytes, the source's had {}",
                now.size, self.size
            ));
        }
        Ok(file)
    }
}
