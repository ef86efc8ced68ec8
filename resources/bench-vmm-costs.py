#!/usr/bin/env python3
"""What the VMM itself costs, hotplug-vmm beside QEMU on the same guest: memory, start-up, and
its share of a hot-plug.

Usage: resources/bench-vmm-costs.py [--runs N] [--cycles N] [--kernel-version 6.1]
                                    [--memory 256M] [--only hotplug-vmm|qemu]
                                    [--startup-only] [--vmm PATH]

Both VMMs hot-plug through ACPI into a slot of the root bus (ours: pcie.0; QEMU: pc, pci.0),
the mode whose cycles take least of the guest's time.

- Start-up: time from exec to the first KVM_RUN, the median of --runs starts. An LD_PRELOAD
  shim (built here with gcc) stamps the first KVM_RUN ioctl with CLOCK_REALTIME; the script
  stamps the moment before it starts the process. Nothing else is traced, so neither VMM is
  slowed.
- Memory: resident memory without guest RAM (/proc/PID/smaps: every mapping's Rss, less the
  mappings at least as large as guest RAM), at the guest's ready marker and after every ten of
  --cycles hot-plug cycles (blockdev-add, device_add, the guest's block device appears,
  device_del, DEVICE_DELETED, the guest's block device is gone, blockdev-del).
- The VMM's share of a hot-plug, from each VMM's own trace of the same cycles (ours:
  --hotplug-trace; QEMU: -trace with its log backend and -msg timestamp=on), medians over the
  cycles:
    device_add received -> the guest's first read of the hot-plug registers
        (the VMM's work, the interrupt, and the guest's wake-up to it);
    the guest's eject write -> DEVICE_DELETED (the VMM's work alone);
  and for this VMM, where its trace has it, device_add received -> the slot's insertion
  (its work before the interrupt).

Prints Markdown tables with the ratios hotplug-vmm / QEMU.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import CACHE, ROOT, VMM, Console, Qmp  # noqa: E402

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int stamped;

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (request == 0xAE80 /* KVM_RUN */ && !__atomic_exchange_n(&stamped, 1, __ATOMIC_SEQ_CST)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        const char *path = getenv("FIRST_KVM_RUN_STAMP");
        FILE *f = path ? fopen(path, "w") : NULL;
        if (f) {
            fprintf(f, "%ld.%09ld\n", (long)ts.tv_sec, ts.tv_nsec);
            fclose(f);
        }
    }
    return real(fd, request, arg);
}
"""


def build_shim(tmp):
    src = os.path.join(tmp, "first-kvm-run.c")
    out = os.path.join(tmp, "first-kvm-run.so")
    with open(src, "w") as f:
        f.write(SHIM)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", out, src, "-ldl"], check=True)
    return out


def default_cmdline():
    out = subprocess.run([VMM, "--help"], capture_output=True, text=True).stdout
    start = out.index("[default: ") + len("[default: ")
    return out[start:out.index("]", start)].strip('"')


def parse_size(s):
    units = {"K": 10, "M": 20, "G": 30}
    return int(s[:-1]) << units[s[-1]] if s[-1] in units else int(s)


def rss_without_guest_ram(pid, ram_bytes):
    """KiB resident in every mapping smaller than guest RAM."""
    total, size = 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = line.split()[0].split("-")
                size = int(hi, 16) - int(lo, 16)
            elif line.startswith("Rss:") and size < ram_bytes:
                total += int(line.split()[1])
    return total


def mappings(pid, ram_bytes):
    """{(start, size, perms, name): Rss KiB} of every mapping smaller than guest RAM."""
    out, key = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                lo, hi = fields[0].split("-")
                size = int(hi, 16) - int(lo, 16)
                name = fields[5] if len(fields) > 5 else "[anon]"
                key = (lo, size, fields[1], name) if size < ram_bytes else None
            elif line.startswith("Rss:") and key:
                out[key] = int(line.split()[1])
    return out


def print_growth(name, before, after, top=12):
    """The mappings whose resident memory grew most between two `mappings` readings."""
    grown = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)
    print(f"{name}: where resident memory grew (KiB, mapping size KiB, perms, name):",
          file=sys.stderr)
    for d, (lo, size, perms, what) in grown[:top]:
        if d > 0:
            new = "" if (lo, size, perms, what) in before else " (new)"
            print(f"  +{d:5d}  {size // 1024:8d}  {perms}  {what}{new}", file=sys.stderr)
    gone = sum(v for k, v in before.items() if k not in after)
    print(f"  mappings gone since: {gone} KiB", file=sys.stderr, flush=True)


def startup(make_cmd, shim, tmp, runs):
    """Milliseconds from exec to the first KVM_RUN, one per run; `make_cmd(i)` is run i's
    command."""
    times = []
    for i in range(runs):
        cmd = make_cmd(i)
        stamp = os.path.join(tmp, f"stamp-{cmd[0].rsplit('/', 1)[-1]}-{i}")
        env = dict(os.environ, LD_PRELOAD=shim, FIRST_KVM_RUN_STAMP=stamp)
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while not (os.path.exists(stamp) and os.path.getsize(stamp) > 0):
                if time.time() > deadline:
                    sys.exit(f"no KVM_RUN within 30 s: {cmd[0]}")
                time.sleep(0.002)
        finally:
            proc.kill()
            proc.wait()
        with open(stamp) as f:
            times.append((float(f.read()) - t0) * 1000)
    return times


def cycles(name, cmd, sock, image, n, ram_bytes, bus):
    """RSS (KiB) at the ready marker and after every tenth cycle; the DEVICE_DELETED events."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        con = Console(proc)
        qmp = Qmp(sock, verbose=False, timeout=600)
        con.wait(lambda l: "HOTPLUG-VMM-READY" in l, 0, timeout=900)
        time.sleep(3)
        rss = [(0, rss_without_guest_ram(proc.pid, ram_bytes))]
        at_ready = mappings(proc.pid, ram_bytes)
        print(f"{name}: ready, {rss[0][1]} KiB", file=sys.stderr, flush=True)
        deleted = []
        for i in range(1, n + 1):
            node = f"c{i}"
            qmp.ok("blockdev-add", {"driver": "raw", "node-name": node,
                                     "file": {"driver": "file", "filename": image}})
            start = len(con.lines)
            qmp.ok("device_add", {"driver": "virtio-blk-pci", "id": node, "drive": node,
                                  "bus": bus})
            con.wait(lambda l: "BLOCK-ADD" in l, start, timeout=120)
            start = len(con.lines)
            qmp.ok("device_del", {"id": node})
            deleted.append(qmp.wait_event("DEVICE_DELETED", node))
            con.wait(lambda l: "BLOCK-REMOVE" in l, start, timeout=120)
            qmp.ok("blockdev-del", {"node-name": node})
            if i % 10 == 0 or i == n:
                rss.append((i, rss_without_guest_ram(proc.pid, ram_bytes)))
                print(f"{name}: {i} cycles, {rss[-1][1]} KiB", file=sys.stderr, flush=True)
        print_growth(name, at_ready, mappings(proc.pid, ram_bytes))
        return rss, deleted
    finally:
        proc.kill()
        proc.wait()


def event_time(e):
    ts = e["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def our_steps(trace_path, deleted):
    """(device_add -> first register read, eject write -> DEVICE_DELETED, device_add -> slot
    insertion) per cycle, in ms, from our trace (one clock: `t`)."""
    recs = [json.loads(line) for line in open(trace_path)]
    add, eject, insert = [], [], []
    for i, r in enumerate(recs):
        if r["kind"] == "qmp-request" and r.get("command") == "device_add":
            nxt = next((s for s in recs[i + 1:] if s["kind"] == "guest-read"), None)
            if nxt:
                add.append((nxt["t"] - r["t"]) * 1000)
            ins = next((s for s in recs[i + 1:] if s["kind"] == "slot"), None)
            if ins:
                insert.append((ins["t"] - r["t"]) * 1000)
        if r["kind"] == "guest-write" and r.get("register") == "EJECT":
            ev = next((s for s in recs[i + 1:] if s["kind"] == "qmp-event"
                       and s.get("event") == "DEVICE_DELETED"), None)
            if ev:
                eject.append((ev["t"] - r["t"]) * 1000)
    return add, eject, insert


QEMU_LINE = re.compile(r"^\d+@(\d+\.\d+):(\w+) ?(.*)$")


def qemu_steps(log_path, deleted):
    """The same steps from QEMU's trace (gettimeofday) and its events' timestamps."""
    recs = []
    for line in open(log_path, errors="replace"):
        m = QEMU_LINE.match(line.strip())
        if m:
            recs.append((float(m.group(1)), m.group(2), m.group(3)))
    add, eject = [], []
    for i, (t, name, args) in enumerate(recs):
        if name == "handle_qmp_command" and '"device_add"' in args:
            # The hot-plug controller's registers, as ours: not the GPE status the guest's
            # SCI handler reads first.
            nxt = next((s for s in recs[i + 1:]
                        if s[1].startswith("acpi_pci_") and s[1].endswith("_read")), None)
            if nxt:
                add.append((nxt[0] - t) * 1000)
    ej_writes = [t for t, name, _ in recs if name == "acpi_pci_ej_write"]
    for e in deleted:
        te = event_time(e)
        before = [t for t in ej_writes if t <= te]
        if before:
            eject.append((te - before[-1]) * 1000)
    return add, eject


def med(v):
    return statistics.median(v) if v else None


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9, help="starts measured per VMM")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--only", choices=["hotplug-vmm", "qemu"])
    ap.add_argument("--startup-only", action="store_true",
                    help="measure only exec -> first KVM_RUN (no guest boots, no cycles)")
    ap.add_argument("--vmm", default=VMM,
                    help="this VMM's binary (to compare builds; default: the release build)")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "hotplug-vmm"], cwd=ROOT,
                   check=True)
    kernel = os.path.join(CACHE, f"linux-{a.kernel_version}", "vmlinux")
    initrd = os.path.join(CACHE, "initramfs.cpio")
    cmdline = default_cmdline()
    ram = parse_size(a.memory)
    tmp = tempfile.mkdtemp(prefix="bench-vmm-costs-")
    shim = build_shim(tmp)
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)

    def ours(sock, trace=None):
        cmd = [a.vmm, "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline,
               "--cpus", "1", "--memory", a.memory, "--qmp", sock]
        return cmd + (["--hotplug-trace", trace] if trace else [])

    def qemu(sock, log=None):
        cmd = ["qemu-system-x86_64", "-machine", "pc,accel=kvm", "-cpu", "host,-arch-capabilities",
               "-m", a.memory, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
               "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
               "-qmp", f"unix:{sock},server=on,wait=off"]
        if log:
            cmd += ["-msg", "timestamp=on", "-D", log, "-trace", "handle_qmp_command",
                    "-trace", "acpi_pci_*"]
        return cmd

    results = {}
    for who in ("hotplug-vmm", "qemu"):
        if a.only not in (None, who):
            continue
        make = ours if who == "hotplug-vmm" else qemu
        starts = startup(lambda i: make(os.path.join(tmp, f"{who}-start-{i}.sock")), shim, tmp,
                         a.runs)
        print(f"{who}: exec -> first KVM_RUN {sorted(starts)} ms", file=sys.stderr, flush=True)
        if a.startup_only:
            print(f"{who}: exec -> first KVM_RUN, median of {a.runs}: {med(starts):.2f} ms")
            continue
        trace = os.path.join(tmp, f"{who}.trace")
        sock = os.path.join(tmp, f"{who}.sock")
        rss, deleted = cycles(who, make(sock, trace), sock, image, a.cycles, ram,
                              "pcie.0" if who == "hotplug-vmm" else "pci.0")
        if who == "hotplug-vmm":
            add, eject, insert = our_steps(trace, deleted)
        else:
            (add, eject), insert = qemu_steps(trace, deleted), []
        results[who] = {"starts_ms": starts, "rss_kib": rss, "add_ms": add, "eject_ms": eject,
                        "insert_ms": insert}

    if a.startup_only:
        return

    def cell(who, f):
        r = results.get(who)
        v = f(r) if r else None
        return "-" if v is None else f"{v:.2f}"

    def ratio(f):
        o, q = results.get("hotplug-vmm"), results.get("qemu")
        if not (o and q) or not f(q):
            return "-"
        return f"{f(o) / f(q):.2f}"

    rows = [
        ("exec -> first KVM_RUN, ms (median of %d)" % a.runs, lambda r: med(r["starts_ms"])),
        ("RSS without guest RAM at the ready marker, MiB", lambda r: r["rss_kib"][0][1] / 1024),
        (f"... after {a.cycles} hot-plug cycles, MiB", lambda r: r["rss_kib"][-1][1] / 1024),
        ("... growth over the cycles, MiB",
         lambda r: (r["rss_kib"][-1][1] - r["rss_kib"][0][1]) / 1024),
        ("device_add -> the guest's first hot-plug register read, ms",
         lambda r: med(r["add_ms"])),
        ("the guest's eject write -> DEVICE_DELETED, ms", lambda r: med(r["eject_ms"])),
        ("device_add -> slot insertion (this VMM's trace only), ms",
         lambda r: med(r["insert_ms"])),
    ]
    print(f"\nThe VMM's own costs, Linux {a.kernel_version}, {a.memory} guest, ACPI slot of "
          f"the root bus (QEMU: pc)")
    print("| | hotplug-vmm | QEMU | ratio |")
    print("| --- | --- | --- | --- |")
    for label, f in rows:
        print(f"| {label} | {cell('hotplug-vmm', f)} | {cell('qemu', f)} | {ratio(f)} |")
    for who, r in results.items():
        print(f"\n{who} RSS without guest RAM (KiB) by cycle: "
              + ", ".join(f"{i}: {k}" for i, k in r["rss_kib"]))


if __name__ == "__main__":
    main()
