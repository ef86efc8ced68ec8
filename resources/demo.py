#!/usr/bin/env python3
"""Boots the hotplug-vmm test guest and shows, from inside the guest, what the VMM gives it."""

import argparse
import os
import re
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
        self.proc.stdin.write(f"echo {begin}; {{ {cmd}\n}} 2>&1; echo {end}$?\n".encode())
        self.proc.stdin.flush()
        b, _ = self.wait(lambda l: l == begin, start)
        e, _ = self.wait(lambda l: l.startswith(end), b)
        return [l for l in self.lines[b + 1:e] if not re.match(r"^\[\s*\d+\.\d+\] |^BLOCK-", l)]


def show(title, lines):
    print(f"\n\033[1m$ {title}\033[0m")
    for l in lines:
        print(f"  {l}")


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

    print(f"demo: booting Linux {args.kernel_version} ({kernel}) with {args.cpus} vCPUs ...", flush=True)
    # Without `quiet` the kernel log streams on the console: the tour shows its ACPI/PCI lines live.
    help_text = subprocess.run([VMM, "--help"], capture_output=True, text=True, check=True).stdout
    start = help_text.index("[default: ") + len("[default: ")
    cmdline = help_text[start:help_text.index("]", start)].strip('"')
    cmd += ["--cmdline", " ".join(p for p in cmdline.split() if p != "quiet")]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    con = Console(proc)
    interesting = re.compile(r"Linux version|Command line|ACPI: (RSDP|XSDT|FACP|DSDT|APIC|MCFG|Interpreter|PM:)|"
                             r"_OSC|PCI Root Bridge|root bus resource|pci 0000|MMCONFIG|ECAM|smp: Brought|"
                             r"ttyS0 at|Run /init")
    i = 0
    while True:
        i, line = con.wait(lambda l: bool(interesting.search(l)), i)
        print(f"  [{time.time() - t0:6.1f}s] {line}", flush=True)
        i += 1
        if "Run /init" in line:
            break
    wait = float(os.environ.get("DEMO_USERSPACE_WAIT", "60"))
    print(f"demo: the kernel is up; waiting up to {wait:.0f}s for the guest's user space "
          "(slow on PVM hosts, see docs/guest-on-pvm.md) ...", flush=True)
    try:
        _, ready = con.wait(lambda l: l.startswith("HOTPLUG-VMM-READY"), i, timeout=wait)
    except SystemExit:
        print("demo: user space did not reach its ready marker in time on this host; stopping the VM.")
        proc.kill()
        proc.wait()
        return
    print(f"demo: guest user space is up after {time.time() - t0:.1f}s: {ready}")
    show("ls /sys/bus/pci/devices", con.run("ls /sys/bus/pci/devices"))
    show("ls /sys/firmware/acpi/tables", con.run("ls /sys/firmware/acpi/tables"))
    print("\n\033[1m$ poweroff -f\033[0m", flush=True)
    proc.stdin.write(b"poweroff -f\n")
    proc.stdin.flush()
    rc = proc.wait(timeout=120)
    print(f"demo: the VMM exited with status {rc} after {time.time() - t0:.1f}s")
    sys.exit(rc)


if __name__ == "__main__":
    main()
