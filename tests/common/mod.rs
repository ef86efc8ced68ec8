//! Harness for integration tests that boot real guests in hotplug-vmm.
//!
//! A [`Guest`] is a running VMM whose serial console is a pipe: the harness reads everything the
//! guest prints (with the host time it arrived) and runs shell commands in the guest's console
//! shell, framed by markers so that their output and exit status can be told apart from the
//! kernel log lines the test guest's /init forwards to the console.
//!
//! Boots are slow on PVM hosts, so a test boots once and checks many things in that boot.

pub mod fuse;
pub mod hotplug;
pub mod migration;
pub mod qmp;
pub mod restore;
pub mod surprise;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Marker the test guest's /init prints when user space is up.
pub const READY_MARKER: &str = "HOTPLUG-VMM-READY";

/// How long a boot may take before the test gives up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Where resources/build-guest.sh caches the guest.
pub fn guest_dir() -> PathBuf {
    if let Ok(c) = std::env::var("HOTPLUG_VMM_CACHE") {
        return PathBuf::from(c).join("guest");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/hotplug-vmm/guest")
}

fn must_exist(p: PathBuf) -> PathBuf {
    assert!(
        p.exists(),
        "{} is missing: build the test guest first with resources/build-guest.sh",
        p.display()
    );
    p
}

/// The test guest's uncompressed kernel for `version` ("6.1" or "6.12").
pub fn vmlinux(version: &str) -> PathBuf {
    must_exist(guest_dir().join(format!("linux-{version}/vmlinux")))
}

/// The test guest's bzImage for `version`.
pub fn bzimage(version: &str) -> PathBuf {
    must_exist(guest_dir().join(format!("linux-{version}/bzImage")))
}

/// The test guest's initramfs.
pub fn initramfs() -> PathBuf {
    must_exist(guest_dir().join("initramfs.cpio"))
}

/// The VMM binary under test.
pub fn vmm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotplug-vmm"))
}

/// The kernel versions the suites run on; `HOTPLUG_VMM_KERNELS=6.1` narrows it.
pub fn kernel_versions() -> Vec<String> {
    std::env::var("HOTPLUG_VMM_KERNELS")
        .unwrap_or_else(|_| "6.1,6.12".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The number in environment variable `name` (a test's knob, such as
/// `HOTPLUG_VMM_SOAK_OPS`), or `default` when it is unset or not a number.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The byte (SOH) that starts every line the test guest prints on its own: the kernel log lines
/// its /init forwards and the uevent helper's block-device reports.
pub const ASYNC_MARK: u8 = 0x01;

/// The guest's console output, cut into lines.
#[derive(Default)]
pub struct Console {
    /// Every complete line the guest printed, with the host time it arrived.
    lines: Vec<(Duration, String)>,
    /// Bytes of the line being printed.
    partial: Vec<u8>,
    /// The line a marked line interrupted, given back its bytes when the marked one ends.
    interrupted: Option<Vec<u8>>,
    closed: bool,
}

impl Console {
    /// Takes one byte the guest printed. A line that starts with [`ASYNC_MARK`] inside another
    /// (a command's output line still open when a kernel line arrived) becomes a line of its own,
    /// and the line it interrupted goes on where it left off.
    pub fn push_byte(&mut self, b: u8, at: Duration) -> Option<&str> {
        match b {
            ASYNC_MARK => {
                let open = std::mem::take(&mut self.partial);
                if !open.is_empty() {
                    self.interrupted = Some(open);
                }
                None
            }
            b'\n' => {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial = self.interrupted.take().unwrap_or_default();
                self.lines.push((at, line));
                self.lines.last().map(|(_, l)| l.as_str())
            }
            b => {
                self.partial.push(b);
                None
            }
        }
    }

    /// The complete lines so far.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|(_, l)| l.as_str())
    }
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

/// Options for booting a guest.
#[derive(Clone, Debug)]
pub struct BootOptions {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cpus: u8,
    pub memory: String,
    /// Extra kernel parameters appended to the VMM's default command line.
    pub extra_cmdline: String,
    /// Options that make the machine (`--root-ports`, `--root-port-hotplug`, ...): with the
    /// fields above, what a snapshot of the booted guest is kept by (see [`restore`]).
    pub machine: Vec<String>,
    /// Every other option: the control socket, disks, policies, the trace.
    pub extra_args: Vec<String>,
}

impl BootOptions {
    /// The test guest with `version`'s vmlinux.
    pub fn new(version: &str) -> Self {
        BootOptions {
            kernel: vmlinux(version),
            initramfs: Some(initramfs()),
            cpus: 1,
            memory: "256M".into(),
            extra_cmdline: String::new(),
            machine: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// The machine most guest tests share, restored from one boot per kernel
    /// ([`Guest::restore`]): four root ports, rp0–rp2 native (the guest's pciehp drives them),
    /// rp3 in ACPI mode, and the root bus's ACPI slots (acpiphp).
    pub fn shared(version: &str) -> Self {
        let mut o = Self::new(version);
        o.machine = vec!["--root-port-hotplug".into(), "rp3=acpi".into()];
        o
    }

    /// Appends kernel parameters.
    pub fn append(mut self, params: &str) -> Self {
        if !self.extra_cmdline.is_empty() {
            self.extra_cmdline.push(' ');
        }
        self.extra_cmdline.push_str(params);
        self
    }

    /// Sets the vCPU count.
    pub fn cpus(mut self, n: u8) -> Self {
        self.cpus = n;
        self
    }

    /// With the control socket at `sock` (`--qmp`).
    pub fn qmp(mut self, sock: &Path) -> Self {
        self.extra_args
            .extend(["--qmp".to_string(), sock.display().to_string()]);
        self
    }

    /// With the hot-plug trace written to `path` (`--hotplug-trace`).
    pub fn hotplug_trace(mut self, path: &Path) -> Self {
        self.extra_args
            .extend(["--hotplug-trace".to_string(), path.display().to_string()]);
        self
    }
}

/// The VMM's default kernel command line, as `--help` prints it.
pub fn default_cmdline() -> String {
    let out = Command::new(vmm_binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let start = help
        .find("[default: ")
        .expect("--help shows the default cmdline");
    let rest = &help[start + "[default: ".len()..];
    // clap quotes a default that has spaces in it.
    rest[..rest.find(']').unwrap()]
        .trim_matches('"')
        .to_string()
}

/// A running VMM with a guest.
pub struct Guest {
    child: Child,
    stdin: ChildStdin,
    console: Shared,
    stderr: Arc<Mutex<String>>,
    started: Instant,
    seq: u32,
    /// Index of the first console line not yet consumed by `run`.
    cursor: usize,
    name: String,
}

impl Guest {
    /// Starts the VMM; does not wait for the guest.
    pub fn start(opts: &BootOptions) -> Guest {
        let mut cmdline = default_cmdline();
        if !opts.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&opts.extra_cmdline);
        }
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--kernel")
            .arg(&opts.kernel)
            .args(["--cpus", &opts.cpus.to_string()])
            .args(["--memory", &opts.memory])
            .args(["--cmdline", &cmdline]);
        if let Some(i) = &opts.initramfs {
            cmd.arg("--initramfs").arg(i);
        }
        cmd.args(&opts.machine)
            .args(&opts.extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn hotplug-vmm");
        let console: Shared = Arc::default();
        let name = format!(
            "{}/{}cpu",
            opts.kernel
                .parent()
                .and_then(Path::file_name)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            opts.cpus
        );

        let mut out = child.stdout.take().unwrap();
        let c = console.clone();
        let echo = std::env::var_os("HOTPLUG_VMM_TEST_ECHO").is_some();
        let tag = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = out.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*c;
                let mut con = lock.lock().unwrap();
                if n == 0 {
                    con.closed = true;
                    cv.notify_all();
                    return;
                }
                for &b in &buf[..n] {
                    let at = started.elapsed();
                    if let Some(line) = con.push_byte(b, at) {
                        if echo {
                            eprintln!("[{tag} {:7.2}] {line}", at.as_secs_f64());
                        }
                    }
                }
                cv.notify_all();
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let s = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = s.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take().unwrap();
        Guest {
            child,
            stdin,
            console,
            stderr,
            started,
            seq: 0,
            cursor: 0,
            name,
        }
    }

    /// Boots and waits for the ready marker; returns the guest and the marker line.
    pub fn boot(opts: &BootOptions) -> (Guest, String) {
        let mut g = Guest::start(opts);
        let line = g.wait_for_line(|l| l.starts_with(READY_MARKER), BOOT_TIMEOUT);
        let t = g.started.elapsed();
        eprintln!("{}: ready after {:.1}s: {line}", g.name, t.as_secs_f64());
        (g, line)
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest printed so far.
    pub fn console_text(&self) -> String {
        let con = self.console.0.lock().unwrap();
        let mut s: String = con.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        s.push_str(&String::from_utf8_lossy(&con.partial));
        s
    }

    /// What the VMM wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Fails the test with `what`, the last console lines and the VMM's stderr.
    pub fn fail(&self, what: &str) -> ! {
        let con = self.console_text();
        let tail: Vec<&str> = con.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{}: {what} (after {:.1}s)\n--- last console lines ---\n{}\n--- VMM stderr ---\n{}",
            self.name,
            self.started.elapsed().as_secs_f64(),
            tail.join("\n"),
            self.stderr_text()
        );
    }

    /// Waits for a console line (from the cursor on) that satisfies `pred`; returns it.
    pub fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.console;
        let mut con = lock.lock().unwrap();
        loop {
            if let Some(i) = (self.cursor..con.lines.len()).find(|&i| pred(&con.lines[i].1)) {
                self.cursor = i + 1;
                return con.lines[i].1.clone();
            }
            if con.closed {
                drop(con);
                self.fail("the VMM exited before the expected console line");
            }
            let now = Instant::now();
            if now >= deadline {
                drop(con);
                self.fail("timed out waiting for a console line");
            }
            con = cv.wait_timeout(con, deadline - now).unwrap().0;
        }
    }

    /// Sends raw bytes to the guest console.
    pub fn send(&mut self, s: &str) {
        self.stdin.write_all(s.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Runs `cmd` in the guest shell; returns (output lines, exit status). Kernel log lines that
    /// /init forwards and block-device reports are left out of the output.
    pub fn run_status(&mut self, cmd: &str, timeout: Duration) -> (String, i32) {
        self.seq += 1;
        let begin = format!("@@B{}", self.seq);
        let end = format!("@@E{} ", self.seq);
        // The extra `echo` ends output that lacks a final newline (e.g. a sysfs attribute).
        self.send(&format!(
            "echo {begin}; {{ {cmd}\n}} 2>&1; __s=$?; echo; echo {end}$__s\n"
        ));
        self.wait_for_line(|l| l == begin, timeout);
        let endl = self.wait_for_line(|l| l.starts_with(&end), timeout);
        let status: i32 = endl[end.len()..].trim().parse().unwrap_or(-1);
        let con = self.console.0.lock().unwrap();
        let start = (0..self.cursor - 1)
            .rev()
            .find(|&i| con.lines[i].1 == begin)
            .unwrap();
        let mut out: Vec<&str> = con.lines[start + 1..self.cursor - 1]
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| !is_async_line(l))
            .collect();
        if out.last() == Some(&"") {
            out.pop();
        }
        (out.join("\n"), status)
    }

    /// Runs `cmd` and requires exit status 0; returns its output.
    pub fn run(&mut self, cmd: &str) -> String {
        let (out, status) = self.run_status(cmd, Duration::from_secs(300));
        if status != 0 {
            self.fail(&format!("`{cmd}` exited with {status}: {out}"));
        }
        out
    }

    /// `poweroff -f` in the guest; returns the VMM's exit status.
    pub fn poweroff(mut self) -> ExitStatus {
        self.send("poweroff -f\n");
        self.wait_exit(Duration::from_secs(120))
    }

    /// Waits for the VMM to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() >= deadline {
                self.fail("the VMM did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Lines the guest prints on its own: forwarded kernel log lines and block-device reports.
pub fn is_async_line(l: &str) -> bool {
    let kmsg = l.starts_with('[')
        && l.find("] ").is_some_and(|i| {
            l[1..i]
                .trim()
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
        });
    kmsg || l.starts_with("BLOCK-ADD ") || l.starts_with("BLOCK-REMOVE ")
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a raw disk image of `size_mib` MiB at `path` with an MBR partition table holding one
/// Linux partition per entry of `partitions_mib` (sizes in MiB, laid out from 1 MiB on), and
/// every other sector filled with a pattern derived from its number. Returns the image bytes.
pub fn make_mbr_disk(path: &Path, size_mib: u64, partitions_mib: &[u64]) -> Vec<u8> {
    let mut img = vec![0u8; (size_mib << 20) as usize];
    for (sector, chunk) in img.chunks_mut(512).enumerate() {
        chunk.fill((sector % 251) as u8);
    }
    img[..512].fill(0);
    let mut lba = 2048u32;
    for (i, &mib) in partitions_mib.iter().enumerate() {
        let sectors = (mib << 11) as u32;
        let e = 0x1be + 16 * i;
        img[e + 4] = 0x83; // Linux
        img[e + 1..e + 4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        img[e + 5..e + 8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        img[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        lba += sectors;
    }
    img[510] = 0x55;
    img[511] = 0xaa;
    std::fs::write(path, &img).unwrap();
    img
}

/// Runs a host tool to completion and returns its stdout; fails the test, with the tool's
/// output, when it cannot start or exits non-zero.
pub fn host_run(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it on the host: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Builds `resources/guest/NAME.c` as a static glibc program into `dir` (for tools that ride on a
/// test disk rather than in the initramfs) and returns its path.
pub fn build_guest_tool(name: &str, dir: &Path) -> PathBuf {
    let src =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../resources/guest/{name}.c"));
    let out = dir.join(name);
    host_run(
        Command::new("gcc")
            .args(["-O2", "-static", "-s", "-o"])
            .arg(&out)
            .arg(&src),
    );
    out
}

/// A scratch directory for one test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("hotplug-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
