//! Disk images served over FUSE by resources/fuse-disk.py: a backend that can die (kill the
//! daemon) or be slow (a read delay, so that the guest always has requests in flight).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::hotplug::make_disk;
use super::TempDir;

/// An image served over FUSE at `mount`/disk.img by resources/fuse-disk.py.
pub struct FuseDisk {
    mount: PathBuf,
    daemon: Child,
}

impl FuseDisk {
    /// Serves a fresh disk with `name`'s signature; every read takes `read_delay_ms`.
    pub fn start(dir: &TempDir, name: &str, read_delay_ms: u32) -> FuseDisk {
        let image = make_disk(dir, name);
        let mount = dir.path(&format!("{name}-mnt"));
        std::fs::create_dir_all(&mount).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/fuse-disk.py");
        let daemon = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(format!("--read-delay-ms={read_delay_ms}"))
            .arg(&image)
            .arg(&mount)
            .stdin(Stdio::null())
            .spawn()
            .expect("start resources/fuse-disk.py");
        let disk = FuseDisk { mount, daemon };
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
