#!/usr/bin/env python3
"""Boot-time benchmark: hotplug-vmm against QEMU (q35, accel=kvm) on the same kernel, command line,
initramfs, memory and vCPU count. Measures the time from process start to the test guest's ready
marker, N runs each, and prints the medians and the ratio ours/QEMU as a Markdown table.

Usage: resources/bench-boot.py [--runs N] [--kernel-version 6.1] [--cpus 1] [--memory 256M]
                               [--timeout SECONDS]
A run that does not reach the marker within the timeout counts as a failure and is reported as such.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("HOTPLUG_VMM_CACHE", os.path.expanduser("~/.cache/hotplug-vmm")), "guest")
VMM = os.path.join(ROOT, "target", "release", "hotplug-vmm")
READY_MARKER = b"HOTPLUG-VMM-READY"
INIT_MARKER = b"Run /init as init process"


def default_cmdline():
    out = subprocess.run([VMM, "--help"], capture_output=True, text=True, check=True).stdout
    start = out.index("[default: ") + len("[default: ")
    return out[start:out.index("]", start)].strip('"')


def time_to_marker(cmd, marker, timeout):
    """Seconds from spawning `cmd` to `marker` on its stdout, or None on timeout/exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    found = threading.Event()
    result = {}

    def reader():
        buf = b""
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                return
            buf = (buf + chunk)[-4096:]
            if marker in buf:
                result["t"] = time.monotonic() - t0
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    found.wait(timeout)
    proc.kill()
    proc.wait()
    return result.get("t")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--until", choices=["ready", "init"], default="ready",
                    help="ready: the test guest's ready marker (user space up); init: the kernel's "
                         "'Run /init as init process' (kernel boot done; quiet is dropped to see it)")
    args = ap.parse_args()
    marker = READY_MARKER if args.until == "ready" else INIT_MARKER

    kernel = os.path.join(CACHE, f"linux-{args.kernel_version}", "vmlinux")
    initrd = os.path.join(CACHE, "initramfs.cpio")
    cmdline = default_cmdline()
    if args.until == "init":
        cmdline = " ".join(p for p in cmdline.split() if p != "quiet")
    ours = [VMM, "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline,
            "--cpus", args.cpus, "--memory", args.memory]
    # -cpu host without arch-capabilities: PVM hosts refuse that MSR (QEMU exits early with it);
    # QEMU's default model does not boot this guest here (docs/guest-on-pvm.md).
    qemu = ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host,-arch-capabilities", "-m", args.memory,
            "-smp", args.cpus, "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]

    rows = []
    for name, cmd in (("hotplug-vmm", ours), ("QEMU q35", qemu)):
        times = []
        for i in range(args.runs):
            t = time_to_marker(cmd, marker, args.timeout)
            print(f"{name} run {i + 1}: {'%.1fs' % t if t is not None else 'no ready marker within %ds' % args.timeout}",
                  file=sys.stderr, flush=True)
            times.append(t)
        rows.append((name, times))

    def med(ts):
        ok = [t for t in ts if t is not None]
        return statistics.median(ok) if len(ok) == len(ts) and ok else None

    what = "ready marker" if args.until == "ready" else "'Run /init as init process'"
    print(f"\nBoot to {what}, Linux {args.kernel_version}, {args.cpus} vCPU, {args.memory}, "
          f"median of {args.runs} (`resources/bench-boot.py --runs {args.runs} --kernel-version {args.kernel_version} --until {args.until}`)\n")
    print("| VMM | median | runs | ratio ours/QEMU |")
    print("| --- | --- | --- | --- |")
    ours_med = med(rows[0][1])
    qemu_med = med(rows[1][1])
    for name, ts in rows:
        m = med(ts)
        runs = ", ".join("%.1f" % t if t is not None else f">{args.timeout:.0f}" for t in ts)
        ratio = ""
        if name == "hotplug-vmm":
            if ours_med is not None and qemu_med is not None:
                ratio = "%.3f" % (ours_med / qemu_med)
            elif ours_med is not None:
                ratio = "< %.3f (QEMU never reached the marker)" % (ours_med / args.timeout)
        print(f"| {name} | {'%.1f s' % m if m is not None else 'did not boot'} | {runs} | {ratio} |")


if __name__ == "__main__":
    main()
