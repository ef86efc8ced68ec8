#!/usr/bin/env python3
"""Restore and live-migration benchmark: hotplug-vmm against QEMU (q35, accel=kvm) on the same
guest (kernel, initramfs, command line, memory, vCPUs).

Each VMM boots the test guest once and saves it while it runs, QEMU with
`migrate "exec:cat > FILE"` and hotplug-vmm the same way (a stream) and with `migrate file:FILE`
(its mappable image). Then, N times each, a fresh process restores it and the script measures:

- exec -> vCPUs running: QEMU's RESUME event (its control socket waits for the script's client
  before QEMU goes on, so the event cannot be missed); hotplug-vmm's "restored: vCPUs running"
  log line, both as wall-clock times against the script's clock at exec;
- exec -> the guest answering: a console command written at exec, until its output comes back.

Then the live-migration downtime (`query-migrate`'s `downtime`) of an idle guest migrated over
`unix:` to a second process of the same VMM on this host, N times each.

Prints Markdown tables with the medians and the ratios ours/QEMU.

Usage: resources/bench-restore.py [--runs N] [--kernel-version 6.1] [--memory 512M] [--cpus 1]
Needs qemu-system-x86 (Debian's) and target/release/hotplug-vmm (cargo build --release).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("HOTPLUG_VMM_CACHE", os.path.expanduser("~/.cache/hotplug-vmm")), "guest")
VMM = os.path.join(ROOT, "target", "release", "hotplug-vmm")
READY = b"HOTPLUG-VMM-READY"


def default_cmdline():
    out = subprocess.run([VMM, "--help"], capture_output=True, text=True, check=True).stdout
    start = out.index("[default: ") + len("[default: ")
    return out[start:out.index("]", start)].strip('"')


class Qmp:
    """A minimal QMP client: commands, and the events that came meanwhile."""

    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.001)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            return m["return"]

    def event(self, name, timeout=120):
        for e in self.events:
            if e["event"] == name:
                return e
        self.s.settimeout(timeout)
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)
                if m["event"] == name:
                    return m

    def wait_migration(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info["status"] != "completed":
                    raise RuntimeError(f"migration {info}")
                return info
            time.sleep(0.01)
        raise RuntimeError("migration did not end")


class Proc:
    """A VMM process whose console is read into a buffer."""

    def __init__(self, cmd, env=None):
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.out = b""
        self.err = b""
        self.cv = threading.Condition()
        self.seen = {}
        threading.Thread(target=self._read, args=(self.p.stdout, "out"), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, "err"), daemon=True).start()

    def _read(self, f, which):
        while True:
            chunk = f.read1(65536)
            if not chunk:
                return
            with self.cv:
                setattr(self, which, getattr(self, which) + chunk)
                self.cv.notify_all()

    def send(self, data):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def wait_for(self, needle, timeout=600, stream="out"):
        """Seconds since exec when `needle` showed up on stdout (or stderr)."""
        deadline = time.time() + timeout
        with self.cv:
            while needle not in getattr(self, stream):
                left = deadline - time.time()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"no {needle!r}; stderr: {self.err[-2000:]!r}")
                self.cv.wait(left)
        return time.time() - self.t0

    def stop(self):
        self.p.kill()
        self.p.wait()


def qemu_cmd(args, kernel, initrd, cmdline, qmp, extra=()):
    # -cpu host without arch-capabilities: PVM hosts refuse that MSR (docs/guest-on-pvm.md).
    return ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host,-arch-capabilities",
            "-m", args.memory, "-smp", args.cpus, "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-qmp", f"unix:{qmp},server=on,wait=off", *extra]


def ours_cmd(args, kernel, initrd, cmdline, qmp, extra=()):
    return [VMM, "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline, "--memory", args.memory,
            "--cpus", args.cpus, "--qmp", qmp, *extra]


def save(cmd, qmp_path, *uris):
    """Boots `cmd`, waits for the guest, saves it to each of `uris` in turn (running it again
    in between, so that each save is of the running guest, a moment apart), ends the process.
    How soon a restored guest answers depends on what it was doing when it was saved: saves
    to compare are made so, from one boot."""
    p = Proc(cmd)
    p.wait_for(READY)
    p.send(b"echo saved-guest\n")
    p.wait_for(b"saved-guest\r\n")
    time.sleep(2)
    q = Qmp(qmp_path)
    for i, uri in enumerate(uris):
        if i:
            q.cmd("cont")
        q.cmd("migrate", uri=uri)
        q.wait_migration()
    p.stop()


def answer_probe(p, tag):
    p.send(f"echo R{tag}$((6*7))\n".encode())
    return p.wait_for(f"R{tag}42".encode(), timeout=120)


def restore_qemu(args, base, qmp_path, saved):
    if os.path.exists(qmp_path):
        os.unlink(qmp_path)
    cmd = base[:]
    i = cmd.index("-qmp")
    cmd[i + 1] = f"unix:{qmp_path},server=on,wait=on"
    cmd += ["-incoming", f"exec:cat {saved}"]
    p = Proc(cmd)
    q = Qmp(qmp_path)
    resume = q.event("RESUME")
    ts = resume["timestamp"]
    running = ts["seconds"] + ts["microseconds"] / 1e6 - p.t0
    answered = answer_probe(p, "q")
    p.stop()
    return running, answered


def restore_ours(base, incoming):
    env = dict(os.environ, RUST_LOG="hotplug_vmm::vm=info")
    p = Proc(base + ["--incoming", incoming], env=env)
    answered = answer_probe(p, "o")
    p.wait_for(b"restored: vCPUs running", stream="err", timeout=5)
    m = re.search(rb"restored: vCPUs running .* \(unix time (\d+\.\d+)\)", p.err)
    running = float(m.group(1)) - p.t0
    p.stop()
    return running, answered


def live_downtime(src_cmd, src_qmp, dst_cmd, dst_qmp, msock):
    for path in (src_qmp, dst_qmp, msock):
        if os.path.exists(path):
            os.unlink(path)
    src = Proc(src_cmd)
    src.wait_for(READY)
    time.sleep(2)
    dst = Proc(dst_cmd)
    qd = Qmp(dst_qmp)
    while not os.path.exists(msock):
        time.sleep(0.005)
    q = Qmp(src_qmp)
    q.cmd("migrate", uri=f"unix:{msock}")
    info = q.wait_migration()
    answer_probe(dst, "l")
    qd.cmd("query-status")
    src.stop()
    dst.stop()
    return info["downtime"] / 1e3, info


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--skip-live", action="store_true")
    args = ap.parse_args()
    kernel = os.path.join(CACHE, f"linux-{args.kernel_version}", "vmlinux")
    initrd = os.path.join(CACHE, "initramfs.cpio")
    cmdline = default_cmdline()
    tmp = tempfile.mkdtemp(prefix="bench-restore-")
    qmp = os.path.join(tmp, "q.sock")
    ours_base = ours_cmd(args, kernel, initrd, cmdline, qmp)
    qemu_base = qemu_cmd(args, kernel, initrd, cmdline, qmp)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)

    ours_stream = os.path.join(tmp, "ours.stream")
    ours_image = os.path.join(tmp, "ours.image")
    qemu_stream = os.path.join(tmp, "qemu.stream")
    save(ours_base, qmp, f"exec:cat > {ours_stream}", f"file:{ours_image}")
    save(qemu_base, qmp, f"exec:cat > {qemu_stream}")
    sizes = {p: os.path.getsize(p) for p in (ours_stream, ours_image, qemu_stream)}
    used = {p: os.stat(p).st_blocks * 512 for p in (ours_image,)}
    log(f"saved: ours stream {sizes[ours_stream] >> 20} MiB, ours image {used[ours_image] >> 20} MiB used, "
        f"QEMU stream {sizes[qemu_stream] >> 20} MiB")

    rows = {"QEMU exec:cat": [], "hotplug-vmm exec:cat": [], "hotplug-vmm file:": []}
    for i in range(args.runs):
        r = restore_qemu(args, qemu_base, qmp, qemu_stream)
        rows["QEMU exec:cat"].append(r)
        r2 = restore_ours(ours_base, f"exec:cat {ours_stream}")
        rows["hotplug-vmm exec:cat"].append(r2)
        r3 = restore_ours(ours_base, f"file:{ours_image}")
        rows["hotplug-vmm file:"].append(r3)
        log(f"run {i + 1}: QEMU {r[0]*1e3:.1f}/{r[1]*1e3:.0f} ms, ours exec {r2[0]*1e3:.1f}/{r2[1]*1e3:.0f} ms, "
            f"ours file {r3[0]*1e3:.1f}/{r3[1]*1e3:.0f} ms")

    q_run = med([r[0] for r in rows["QEMU exec:cat"]])
    q_ans = med([r[1] for r in rows["QEMU exec:cat"]])
    print(f"\nRestore of a booted guest, Linux {args.kernel_version}, {args.memory}, {args.cpus} vCPU, "
          f"median of {args.runs} (`resources/bench-restore.py --runs {args.runs} --memory {args.memory}`)\n")
    print("| restore | exec -> vCPUs running | ratio to QEMU (goal <= 0.1) | exec -> guest answers | ratio to QEMU (goal <= 0.75) |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in rows.items():
        run = med([r[0] for r in rs])
        ans = med([r[1] for r in rs])
        print(f"| {name} | {run*1e3:.1f} ms | {run/q_run:.3f} | {ans*1e3:.0f} ms | {ans/q_ans:.3f} |")

    if args.skip_live:
        return
    msock = os.path.join(tmp, "m.sock")
    dqmp = os.path.join(tmp, "d.sock")
    lives = {"QEMU": [], "hotplug-vmm": []}
    for i in range(args.runs):
        src = qemu_cmd(args, kernel, initrd, cmdline, qmp)
        dst = qemu_cmd(args, kernel, initrd, cmdline, dqmp, ["-incoming", f"unix:{msock}"])
        d, _ = live_downtime(src, qmp, dst, dqmp, msock)
        lives["QEMU"].append(d)
        src = ours_cmd(args, kernel, initrd, cmdline, qmp)
        dst = ours_cmd(args, kernel, initrd, cmdline, dqmp, ["--incoming", f"unix:{msock}"])
        d2, info = live_downtime(src, qmp, dst, dqmp, msock)
        lives["hotplug-vmm"].append(d2)
        log(f"live run {i + 1}: QEMU {d*1e3:.0f} ms, ours {d2*1e3:.0f} ms ({info['ram']['dirty-sync-count']} passes)")
    qd = med(lives["QEMU"])
    print(f"\nLive migration over unix: of an idle guest on one host, downtime, median of {args.runs}\n")
    print("| VMM | downtime | ratio to QEMU |")
    print("| --- | --- | --- |")
    for name, ds in lives.items():
        print(f"| {name} | {med(ds)*1e3:.0f} ms | {med(ds)/qd:.3f} |")


if __name__ == "__main__":
    main()
