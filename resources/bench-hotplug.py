#!/usr/bin/env python3
"""Hot-plug latency, hotplug-vmm side by side with QEMU on the same guest and disk images.

Usage: resources/bench-hotplug.py [--runs N] [--kernel-version 6.1] [--only hotplug-vmm|qemu]
                                  [--modes native,acpi-port,acpi-root]
                                  [--vmm-arg=--no-command-completed]

For each mode and VMM: boot the test guest once (with a control socket), then N times:
blockdev-add, device_add of virtio-blk-pci, time until the guest's /init reports the new block
device (BLOCK-ADD on the console); device_del, time until DEVICE_DELETED; wait for the guest's
BLOCK-REMOVE; blockdev-del. Then, for hotplug-vmm only (QEMU has no surprise removal), N times:
device_add, wait for the block device, x-surprise-remove, time until the guest's /init reports
the block device gone (BLOCK-REMOVE). Every timed step starts 2 s after the guest's last one
ended, so that it does not share the guest's CPU with the tail of the boot or of the last
removal (uevent helpers, the block layer's teardown) on either VMM.

Modes, each side by side with the QEMU setup that hot-plugs the same way:
  native     a PCIe root port driven by the guest's pciehp. QEMU: q35 with a pcie-root-port and
             ACPI hot-plug off for bridges (-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off).
  acpi-port  a PCIe root port driven by the guest's acpiphp (ours: --root-port-hotplug acpi).
             QEMU: q35 with a pcie-root-port and its default ACPI hot-plug of bridges.
  acpi-root  a slot of the root bus driven by acpiphp (ours: pcie.0). QEMU: pc (i440fx), pci.0;
             q35's pcie.0 does not hot-plug.
Prints the medians and the ratios hotplug-vmm / QEMU.

device_del -> DEVICE_DELETED is dominated by the guest in native mode: pciehp waits 5 s after
the attention button before it lets go, on any VMM. acpiphp has no such wait.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import CACHE, VMM, Console, Qmp  # noqa: E402


def default_cmdline():
    out = subprocess.run([VMM, "--help"], capture_output=True, text=True).stdout
    start = out.index("[default: ") + len("[default: ")
    return out[start:out.index("]", start)].strip('"')


# Seconds to let the guest go quiet before each timed step.
SETTLE_S = 2.0


def measure(name, cmd, sock, images, runs, bus, surprise):
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        con = Console(proc)
        qmp = Qmp(sock, verbose=False, timeout=600)
        con.wait(lambda l: "HOTPLUG-VMM-READY" in l, 0, timeout=900)
        adds, dels = [], []
        for i in range(runs):
            # Each measurement starts from a quiet guest: not while it still handles the boot's
            # or the last removal's tail (uevent helpers, the block layer's teardown).
            time.sleep(SETTLE_S)
            node = f"bench{i}"
            qmp.ok("blockdev-add", {"driver": "raw", "node-name": node,
                                     "file": {"driver": "file", "filename": images[i % len(images)]}})
            start = len(con.lines)
            t0 = time.time()
            qmp.ok("device_add", {"driver": "virtio-blk-pci", "id": node, "drive": node, "bus": bus})
            con.wait(lambda l: "BLOCK-ADD" in l, start, timeout=120)
            adds.append(time.time() - t0)
            start = len(con.lines)
            t0 = time.time()
            qmp.ok("device_del", {"id": node})
            qmp.wait_event("DEVICE_DELETED", node)
            dels.append(time.time() - t0)
            con.wait(lambda l: "BLOCK-REMOVE" in l, start, timeout=120)
            qmp.ok("blockdev-del", {"node-name": node})
            print(f"{name} run {i + 1}: add {adds[-1]:.2f}s, del {dels[-1]:.2f}s", file=sys.stderr, flush=True)
        pulls = []
        for i in range(runs if surprise else 0):
            time.sleep(SETTLE_S)
            node = f"pull{i}"
            qmp.ok("blockdev-add", {"driver": "raw", "node-name": node,
                                     "file": {"driver": "file", "filename": images[i % len(images)]}})
            start = len(con.lines)
            qmp.ok("device_add", {"driver": "virtio-blk-pci", "id": node, "drive": node, "bus": bus})
            con.wait(lambda l: "BLOCK-ADD" in l, start, timeout=120)
            time.sleep(SETTLE_S)
            start = len(con.lines)
            t0 = time.time()
            qmp.ok("x-surprise-remove", {"id": node, "bar-reads": "zero"})
            con.wait(lambda l: "BLOCK-REMOVE" in l, start, timeout=120)
            pulls.append(time.time() - t0)
            qmp.ok("blockdev-del", {"node-name": node})
            print(f"{name} surprise run {i + 1}: gone in {pulls[-1]:.2f}s", file=sys.stderr, flush=True)
        return adds, dels, pulls
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--only", choices=["hotplug-vmm", "qemu"])
    ap.add_argument("--modes", default="native,acpi-port,acpi-root",
                    help="comma-separated: native, acpi-port, acpi-root")
    ap.add_argument("--vmm-arg", action="append", default=[],
                    help="extra hotplug-vmm argument, e.g. --vmm-arg=--no-command-completed")
    args = ap.parse_args()
    kernel = os.path.join(CACHE, f"linux-{args.kernel_version}", "vmlinux")
    initrd = os.path.join(CACHE, "initramfs.cpio")
    cmdline = default_cmdline()
    tmp = tempfile.mkdtemp(prefix="bench-hotplug-")
    images = []
    for i in range(2):
        path = os.path.join(tmp, f"disk{i}.img")
        with open(path, "wb") as f:
            f.truncate(16 << 20)
        images.append(path)

    qemu_common = ["qemu-system-x86_64", "-cpu", "host,-arch-capabilities",
                   "-m", args.memory, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                   "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    root_ports = ["-device", "pcie-root-port,id=rp0,chassis=1,slot=0",
                  "-device", "pcie-root-port,id=rp1,chassis=2,slot=1"]
    # mode: (our extra arguments, our bus, QEMU's label, QEMU's machine arguments, QEMU's bus)
    # -cpu host without arch-capabilities: PVM hosts refuse that MSR; QEMU's default model does
    # not boot this guest there (docs/guest-on-pvm.md).
    modes = {
        "native": ([], "rp1", "QEMU q35",
                   ["-machine", "q35,accel=kvm",
                    "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"] + root_ports, "rp1"),
        "acpi-port": (["--root-port-hotplug", "acpi"], "rp1", "QEMU q35",
                      ["-machine", "q35,accel=kvm",
                       "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on"] + root_ports, "rp1"),
        "acpi-root": ([], "pcie.0", "QEMU pc", ["-machine", "pc,accel=kvm"], "pci.0"),
    }
    rows = []
    for mode in args.modes.split(","):
        if mode not in modes:
            sys.exit(f"unknown mode {mode!r} (native, acpi-port, acpi-root)")
        ours_args, ours_bus, qemu_name, qemu_args, qemu_bus = modes[mode]
        results = {}
        if args.only in (None, "hotplug-vmm"):
            sock = os.path.join(tmp, f"ours-{mode}.sock")
            cmd = [VMM, "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline, "--cpus", "1",
                   "--memory", args.memory, "--qmp", sock] + ours_args + args.vmm_arg
            results["ours"] = measure(f"hotplug-vmm {mode}", cmd, sock, images, args.runs, ours_bus, True)
        if args.only in (None, "qemu"):
            sock = os.path.join(tmp, f"qemu-{mode}.sock")
            cmd = qemu_common + qemu_args + ["-qmp", f"unix:{sock},server=on,wait=off"]
            results["qemu"] = measure(f"{qemu_name} {mode}", cmd, sock, images, args.runs, qemu_bus, False)
        for i, what in enumerate(["device_add -> /dev/vdX in the guest", "device_del -> DEVICE_DELETED",
                                  "x-surprise-remove -> /dev/vdX gone in the guest"]):
            median = lambda who: statistics.median(results[who][i]) if results.get(who) and results[who][i] else None  # noqa: E731
            ours, qemu = median("ours"), median("qemu")
            rows.append((f"{mode}: {what}", qemu_name, ours, qemu))

    print(f"\nhot-plug latency, Linux {args.kernel_version}, median of {args.runs} runs")
    print("| | hotplug-vmm | QEMU | ratio |")
    print("| --- | --- | --- | --- |")
    for label, qemu_name, ours, qemu in rows:
        fmt = lambda v: f"{v:.2f} s" if v is not None else "-"  # noqa: E731
        ratio = f"{ours / qemu:.2f}" if ours and qemu else "-"
        print(f"| {label} | {fmt(ours)} | {fmt(qemu)} ({qemu_name}) | {ratio} |")


if __name__ == "__main__":
    main()
