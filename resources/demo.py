#!/usr/bin/env python3
"""Boots the hotplug-vmm test guest and shows, from inside the guest, what the VMM gives it."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("HOTPLUG_VMM_CACHE", os.path.expanduser("~/.cache/hotplug-vmm")), "guest")
VMM = os.path.join(ROOT, "target", "release", "hotplug-vmm")


class Console:
    """The guest's serial console: collects lines, runs shell commands between markers."""

    def __init__(self, proc):
        self.proc = proc
        self.lines = []
        self.cond = threading.Condition()
        self.seq = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                with self.cond:
                    self.lines.append(None)
                    self.cond.notify_all()
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                # A line the guest prints on its own starts with SOH; one that lands inside an
                # open line of a command's output is taken out whole (see resources/guest/init).
                if b"\x01" in line:
                    head, marked = line.split(b"\x01", 1)
                    buf = head + buf
                    line = marked
                with self.cond:
                    self.lines.append(line.decode(errors="replace").rstrip("\r"))
                    self.cond.notify_all()

    def wait(self, pred, start=0, timeout=900):
        """Index and text of the first line from `start` on that satisfies `pred`; exits on timeout."""
        deadline = time.time() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    if line is None:
                        sys.exit("demo: the VMM exited unexpectedly")
                    if pred(line):
                        return i, line
                    i += 1
                left = deadline - time.time()
                if left <= 0:
                    sys.exit("demo: timed out waiting for the guest")
                self.cond.wait(left)

    def run(self, cmd):
        self.seq += 1
        begin, end = f"@@B{self.seq}", f"@@E{self.seq} "
        start = len(self.lines)
        self.proc.stdin.write(f"echo {begin}; {{ {cmd}\n}} 2>&1; __s=$?; echo; echo {end}$__s\n".encode())
        self.proc.stdin.flush()
        b, _ = self.wait(lambda l: l == begin, start)
        e, _ = self.wait(lambda l: l.startswith(end), b)
        out = [l for l in self.lines[b + 1:e] if not re.match(r"^\[\s*\d+\.\d+\] |^BLOCK-", l)]
        return out[:-1] if out and out[-1] == "" else out


class Qmp:
    """A minimal QMP client (the demo and benchmarks need nothing but Python's standard library)."""

    def __init__(self, path, verbose=True, timeout=60):
        self.verbose = verbose
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events = []
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        msg = json.loads(self.file.readline())
        if "event" in msg:
            self.events.append(msg)
        return msg

    def cmd(self, name, args=None):
        """Runs `name`; returns the reply ({"return": ...} or {"error": ...})."""
        msg = {"execute": name, **({"arguments": args} if args else {})}
        if self.verbose:
            print(f"\033[1mqmp> {json.dumps(msg)}\033[0m", flush=True)
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" not in reply:
                if self.verbose:
                    print(f"  <- {json.dumps(reply)}", flush=True)
                return reply

    def ok(self, name, args=None):
        """Runs `name` and raises on an error reply."""
        reply = self.cmd(name, args)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]

    def wait_event(self, name, device=None, timeout=120):
        """Waits for event `name` (of `device`, if given), printing events as they come if verbose."""
        self.sock.settimeout(timeout)
        seen = 0
        while True:
            while seen < len(self.events):
                e = self.events[seen]
                seen += 1
                if self.verbose:
                    print(f"  <- event {e['event']} {json.dumps(e.get('data'))}", flush=True)
                if e["event"] == name and device in (None, e.get("data", {}).get("device")):
                    del self.events[:seen]
                    return e
            self._read()


def show(title, lines):
    print(f"\n\033[1m$ {title}\033[0m")
    for l in lines:
        print(f"  {l}")


def hot_add(qmp, con, dev_id, bus):
    """device_add of a virtio-blk disk on node "hot" onto `bus`; returns the guest's vdX."""
    start = len(con.lines)
    t = time.time()
    qmp.cmd("device_add", {"driver": "virtio-blk-pci", "id": dev_id, "drive": "hot", "bus": bus})
    _, line = con.wait(lambda l: "BLOCK-ADD" in l, start, timeout=120)
    print(f"demo: the guest reports {line[line.index('BLOCK-ADD'):]!r} {time.time() - t:.1f}s after device_add")
    return line[line.index("BLOCK-ADD"):].split()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--shell", action="store_true", help="interactive guest console instead of the tour")
    ap.add_argument("--cpus", default="2")
    args = ap.parse_args()
    kernel = os.path.join(CACHE, f"linux-{args.kernel_version}", "vmlinux")
    cmd = [VMM, "--kernel", kernel, "--initramfs", os.path.join(CACHE, "initramfs.cpio"),
           "--cpus", args.cpus, "--memory", "256M"]
    if args.shell:
        print("Booting; the guest console follows. Ctrl-A x quits.", flush=True)
        os.execv(VMM, cmd)

    # A disk for the guest: 64 MiB, an MBR with one partition, a message at sector 4096.
    disk = os.path.join(CACHE, "demo-disk.img")
    img = bytearray(64 << 20)
    img[0x1be + 4] = 0x83
    img[0x1be + 8:0x1be + 16] = (2048).to_bytes(4, "little") + (16 << 11).to_bytes(4, "little")
    img[510:512] = b"\x55\xaa"
    msg = b"written by the host before boot"
    img[4096 * 512:4096 * 512 + len(msg)] = msg
    with open(disk, "wb") as f:
        f.write(img)
    cmd += ["--disk", f"path={disk},id=demo-disk"]
    # A second disk for the hot-plug part: 16 MiB with a message at its start.
    hot = os.path.join(CACHE, "demo-hot.img")
    with open(hot, "wb") as f:
        f.truncate(16 << 20)
        f.write(b"hot-added from the host")
    sock = os.path.join(CACHE, "demo-qmp.sock")
    # Root port rp2 hot-plugged through ACPI (acpiphp), the others natively (pciehp).
    trace = os.path.join(CACHE, "demo-trace.jsonl")
    cmd += ["--qmp", sock, "--root-port-hotplug", "rp2=acpi", "--hotplug-trace", trace]

    # The booted guest is saved once and restored from then on (docs/migration.md).
    # Keyed by the VMM build: a rebuilt VMM boots and saves afresh (and the old save goes).
    st = os.stat(VMM)
    build = f"{st.st_size:x}{int(st.st_mtime):x}"
    snap = os.path.join(CACHE, f"demo-booted-{args.kernel_version}-{args.cpus}cpu-{build}.snap")
    for old in os.listdir(CACHE):
        if old.startswith("demo-booted-") and os.path.join(CACHE, old) != snap:
            os.unlink(os.path.join(CACHE, old))
    if not os.path.exists(snap):
        print(f"demo: booting Linux {args.kernel_version} ({kernel}) with {args.cpus} vCPUs and a "
              f"64 MiB virtio-blk disk; about 80-120 s on PVM hosts (docs/guest-on-pvm.md) ...", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        con = Console(proc)
        _, ready = con.wait(lambda l: l.startswith("HOTPLUG-VMM-READY"), 0, timeout=600)
        print(f"demo: guest user space is up after {time.time() - t0:.1f}s: {ready}")
        qmp = Qmp(sock, verbose=False)
        qmp.ok("migrate", {"uri": f"file:{snap}"})
        while qmp.ok("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        info = qmp.ok("query-migrate")
        print(f"demo: migrate file:{snap}: {info['status']}, the guest stopped for {info.get('downtime', 0)} ms; "
              f"{info['ram']['normal-bytes'] >> 20} MiB of its memory were not zero")
        qmp.cmd("quit")
        proc.wait()
    print(f"\n\033[1m$ hotplug-vmm --incoming file:{snap} ...\033[0m", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd + ["--incoming", f"file:{snap}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    con = Console(proc)
    proc.stdin.write(b"echo restored-guest-answers\n")
    proc.stdin.flush()
    try:
        con.wait(lambda l: l.startswith("restored-guest-answers"), 0, timeout=60)
    except SystemExit:
        err = proc.stderr.read().decode(errors="replace").strip()
        os.unlink(snap)
        sys.exit(f"demo: the saved guest did not restore ({err}); it is deleted: run the demo again to boot afresh")
    print(f"demo: restored the booted guest from {snap}; its console answered {time.time() - t0:.2f}s after exec")
    threading.Thread(target=lambda: sys.stderr.buffer.write(proc.stderr.read()), daemon=True).start()
    interesting = (r"Linux version|ACPI: (RSDP|XSDT|FACP|DSDT|APIC|MCFG) |_OSC: OS now|PCI Root Bridge|"
                   r"MMCONFIG|ECAM|pci 0000:00:..\.0: \[|smp: Brought|ttyS0 at|pciehp: Slot|virtio_blk| vda:")
    show("dmesg | grep -E '<ACPI, PCI, root port, SMP, console and disk lines>'",
         [l.replace("K: ", "", 1) for l in con.run(f"dmesg | grep -E '{interesting}' | sed 's/^/K: /'")])
    show("ls /sys/bus/pci/devices", con.run("ls /sys/bus/pci/devices"))
    show("cat /sys/block/vda/serial /sys/block/vda/size; echo",
         con.run("cat /sys/block/vda/serial; echo; cat /sys/block/vda/size"))
    show("dd if=/dev/vda bs=512 skip=4096 count=1 | head -c 31",
         con.run("dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 31; echo"))
    show("echo 'written by the guest' | dd of=/dev/vda bs=512 seek=8192 conv=sync oflag=direct; sync",
         con.run("echo 'written by the guest' | dd of=/dev/vda bs=512 seek=8192 conv=sync oflag=direct 2>&1; sync"))

    print("\n\033[1m--- Native PCIe hot-plug through the control socket (QMP) ---\033[0m", flush=True)
    qmp = Qmp(sock)
    qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "hot",
                             "file": {"driver": "file", "filename": hot}})
    dev = hot_add(qmp, con, "hot", "rp1")
    show(f"dmesg | grep 'Slot(1)'; cat /sys/block/{dev}/serial; head -c 23 /dev/{dev}",
         [l.replace("K: ", "", 1) for l in con.run(
             f"dmesg | grep 'Slot(1)' | sed 's/^/K: /'; cat /sys/block/{dev}/serial; echo; head -c 23 /dev/{dev}; echo")])
    t = time.time()
    qmp.cmd("device_del", {"id": "hot"})
    qmp.wait_event("DEVICE_DELETED")
    print(f"demo: DEVICE_DELETED {time.time() - t:.1f}s after device_del (pciehp waits 5 s before letting go)")
    show("dmesg | grep 'Slot(1)' | tail -3; ls /sys/block",
         [l.replace("K: ", "", 1) for l in con.run("dmesg | grep 'Slot(1)' | tail -3 | sed 's/^/K: /'; ls /sys/block")])

    print("\n\033[1m--- ACPI hot-plug of root port rp2 (acpiphp, Generic Event Device, _EJ0) ---\033[0m", flush=True)
    osc = qmp.ok("x-query-hotplug")["osc"]["committed"]
    print(f"demo: the guest's _OSC asked for {osc['requested-decoded']} and got {osc['granted-decoded']}; "
          f"rp2 does not advertise Hot-Plug Capable, so acpiphp drives it")
    dev = hot_add(qmp, con, "hot-acpi", "rp2")
    grep = r"dmesg | grep -E 'acpiphp: Slot \[2\]|pci 0000:0[1-9]:00.0: \[1af4' | tail -2"
    show(f"{grep}; cat /sys/block/{dev}/serial",
         [l.replace("K: ", "", 1) for l in con.run(f"{grep} | sed 's/^/K: /'; cat /sys/block/{dev}/serial")])
    t = time.time()
    qmp.cmd("device_del", {"id": "hot-acpi"})
    qmp.wait_event("DEVICE_DELETED", "hot-acpi")
    print(f"demo: DEVICE_DELETED {time.time() - t:.1f}s after device_del (acpiphp ejects at once)")
    show("ls /sys/block", con.run("ls /sys/block"))

    print("\n\033[1m--- Surprise removal of a disk being read (rp1, pciehp) ---\033[0m", flush=True)
    dev = hot_add(qmp, con, "hot-pull", "rp1")
    # A reader that reads the disk over and over until a read fails (one pass takes well under a second).
    con.run(f"(while :; do dd if=/dev/{dev} of=/dev/null bs=4k iflag=direct 2>/tmp/dd.err "
            f"|| {{ echo \"dd exit $?\" >> /tmp/dd.err; break; }}; done) &")
    con.run("sleep 1")
    start = len(con.lines)
    t = time.time()
    qmp.cmd("x-surprise-remove", {"id": "hot-pull", "bar-reads": "zero"})  # all-ones: Linux virtio-pci spins (docs/surprise-removal.md)
    qmp.wait_event("DEVICE_DELETED", "hot-pull")
    con.wait(lambda l: f"BLOCK-REMOVE {dev}" in l, start, timeout=120)
    print(f"demo: the guest removed /dev/{dev} {time.time() - t:.1f}s after x-surprise-remove")
    grep = r"dmesg | grep -E 'Slot\(1\)|I/O error' | tail -4"
    show(f"cat /tmp/dd.err; {grep}",
         [l.replace("K: ", "", 1) for l in con.run(f"sleep 1; cat /tmp/dd.err; {grep} | sed 's/^/K: /'")])
    qmp.cmd("blockdev-del", {"node-name": "hot"})
    timeline = subprocess.run([sys.executable, os.path.join(ROOT, "resources", "hotplug-timeline.py"), trace,
                               "--no-queries", "--from", f"{t - t0 - 1:.1f}"],
                              capture_output=True, text=True).stdout.splitlines()
    show(f"resources/hotplug-timeline.py {trace} --no-queries  # the surprise removal, first lines",
         timeline[:24])

    print("\n\033[1m$ poweroff -f\033[0m", flush=True)
    proc.stdin.write(b"poweroff -f\n")
    proc.stdin.flush()
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print("\n".join(l for l in con.lines[-20:] if l is not None))
        sys.exit("demo: the guest did not power off within 120 s; VMM killed")
    print(f"demo: the VMM exited with status {rc} after {time.time() - t0:.1f}s")
    with open(disk, "rb") as f:
        f.seek(8192 * 512)
        print(f"demo: the host reads sector 8192 of {disk}: {f.read(21).decode(errors='replace')!r}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
