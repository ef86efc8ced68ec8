//! Disk images served over FUSE by resources/fuse-disk.py: a backend that can die (kill the
//! daemon) or hold its I/O (a gate), so that the guest has requests in flight when something
//! happens to the disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::hotplug::make_disk;
use super::TempDir;

/// An image served over FUSE at `mount`/disk.img by resources/fuse-disk.py.
pub struct FuseDisk {
    mount: PathBuf,
    gate: PathBuf,
    daemon: Child,
}

impl FuseDisk {
    /// Serves a fresh disk with `name`'s signature.
    pub fn start(dir: &TempDir, name: &str) -> FuseDisk {
        FuseDisk::serve(dir, name, &make_disk(dir, name))
    }

    /// Serves the disk image `image` under `name`.
    pub fn serve(dir: &TempDir, name: &str, image: &Path) -> FuseDisk {
        let mount = dir.path(&format!("{name}-mnt"));
        std::fs::create_dir_all(&mount).unwrap();
        let gate = dir.path(&format!("{name}-gate"));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/fuse-disk.py");
        let daemon = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg("--gate")
            .arg(&gate)
            .arg(image)
            .arg(&mount)
            .stdin(Stdio::null())
            .spawn()
            .expect("start resources/fuse-disk.py");
        let disk = FuseDisk {
            mount,
            gate,
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !disk.file().exists() {
            assert!(
                Instant::now() < deadline,
                "FUSE mount at {} (needs /dev/fuse and python3-fusepy)",
                disk.mount.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        disk
    }

    pub fn file(&self) -> PathBuf {
        self.mount.join("disk.img")
    }

    /// From now on reads, writes and fsyncs wait (the request being served blocks in the
    /// host's I/O, the guest's next ones wait in the virtqueue) until they are released ([`FuseDisk::release_after`]).
    pub fn hold(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }

    /// Releases the held I/O `delay` from now, from another thread: for releasing it while
    /// the test thread waits on something that needs it released.
    pub fn release_after(&self, delay: Duration) -> std::thread::JoinHandle<()> {
        let gate = self.gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::fs::remove_file(gate);
        })
    }

    /// The server dies: every access to the file fails from now on.
    pub fn kill(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}
