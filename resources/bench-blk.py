#!/usr/bin/env python3
"""virtio-blk data path, hotplug-vmm side by side with QEMU: fio inside the same guest.

Usage: resources/bench-blk.py [--kernel-version 6.1] [--cpus 1] [--runtime 10] [--append PARAMS]
                              [--only hotplug-vmm|qemu-threads|qemu-io_uring] [--jobs N]

Every setup boots the same test guest with two virtio-blk disks: the 1 GiB raw file under test
(random data, the same file for every setup) and a read-only ext4 image holding Debian's fio and
every library ldd names (too big for the initramfs; the guest mounts it and runs fio chrooted).
In the guest, fio (libaio, O_DIRECT, time based, after a 2 s ramp) runs 4k random read and write
at iodepth 1 and 32 (IOPS) and 128k sequential read and write at iodepth 16 (MB/s) on the disk.

Setups, with the same cache mode (the host page cache: hotplug-vmm does buffered I/O, QEMU's
default cache=writeback) and the same vCPUs:
  hotplug-vmm     one I/O thread per disk (ioeventfd in, irqfd out)
  qemu-threads    QEMU q35, virtio-blk-pci with an iothread, aio=threads
  qemu-io_uring   the same with aio=io_uring
Prints one table: each row's result per setup and the ratio hotplug-vmm / QEMU's best.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import CACHE, VMM, Console  # noqa: E402

# (label, fio rw, block size, iodepth, unit)
JOBS = [
    ("4k random read, iodepth 1", "randread", "4k", 1, "IOPS"),
    ("4k random read, iodepth 32", "randread", "4k", 32, "IOPS"),
    ("4k random write, iodepth 1", "randwrite", "4k", 1, "IOPS"),
    ("4k random write, iodepth 32", "randwrite", "4k", 32, "IOPS"),
    ("128k sequential read, iodepth 16", "read", "128k", 16, "MB/s"),
    ("128k sequential write, iodepth 16", "write", "128k", 16, "MB/s"),
]
# fio --terse-version=3 fields (1-based): read bandwidth KiB/s 7, read IOPS 8, write bandwidth 48,
# write IOPS 49.
TERSE = {"read": (7, 8), "write": (48, 49)}


def default_cmdline():
    out = subprocess.run([VMM, "--help"], capture_output=True, text=True).stdout
    start = out.index("[default: ") + len("[default: ")
    return out[start:out.index("]", start)].strip('"')


def tools_image():
    """An ext4 image with fio and its libraries, cached by fio's version."""
    fio = shutil.which("fio")
    if not fio:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "fio"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        fio = shutil.which("fio")
    version = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()
    image = os.path.join(CACHE, f"fio-tools-{version}.ext4")
    if os.path.exists(image):
        return image
    root = tempfile.mkdtemp(prefix="fio-tools-")
    files = [os.path.realpath(fio)]
    for line in subprocess.run(["ldd", fio], capture_output=True, text=True, check=True).stdout.splitlines():
        files += [w for w in line.split() if w.startswith("/")]
    for f in files:
        dest = root + (f if f != os.path.realpath(fio) else "/usr/bin/fio")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(f, dest, follow_symlinks=True)
    for d in ("dev", "proc", "sys", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    used = int(subprocess.run(["du", "-sm", root], capture_output=True, text=True).stdout.split()[0])
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", root, "-L", "fio", image + ".tmp",
                    f"{used + used // 4 + 16}M"], check=True)
    os.rename(image + ".tmp", image)
    shutil.rmtree(root)
    return image


def data_file():
    path = os.path.join(CACHE, "bench-blk-1g.img")
    if not os.path.exists(path) or os.path.getsize(path) != 1 << 30:
        with open("/dev/urandom", "rb") as src, open(path + ".tmp", "wb") as dst:
            for _ in range(1024):
                dst.write(src.read(1 << 20))
        os.rename(path + ".tmp", path)
    return path


def run_setup(name, cmd, runtime):
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    results = {}
    try:
        con = Console(proc)
        con.wait(lambda l: "HOTPLUG-VMM-READY" in l, 0, timeout=900)
        find = "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {} ] && echo ${{d##*/}}; done"
        data = con.run(find.format("data"))[-1].strip()
        tools = con.run(find.format("tools"))[-1].strip()
        setup = (f"mkdir -p /mnt/t && mount -o ro /dev/{tools} /mnt/t && mount --bind /dev /mnt/t/dev && "
                 f"mount -t proc proc /mnt/t/proc && mount -t sysfs sys /mnt/t/sys && "
                 f"mount -t tmpfs tmp /mnt/t/tmp && echo mounted")
        out = con.run(setup)
        if "mounted" not in out:
            sys.exit(f"{name}: cannot mount the fio image: {out}")
        for label, rw, bs, depth, unit in JOBS:
            line = next((l for l in con.run(
                f"chroot /mnt/t /usr/bin/fio --name=j --filename=/dev/{data} --direct=1 --ioengine=libaio "
                f"--rw={rw} --bs={bs} --iodepth={depth} --time_based --runtime={runtime} --ramp_time=2 "
                f"--randrepeat=0 --norandommap --thread --output-format=terse --terse-version=3")
                if l.startswith("3;")), None)
            if line is None:
                print(f"{name}: {label}: fio printed no result", file=sys.stderr)
                continue
            fields = line.split(";")
            bw, iops = TERSE["read" if "read" in rw else "write"]
            value = float(fields[iops - 1]) if unit == "IOPS" else float(fields[bw - 1]) * 1024 / 1e6
            results[label] = value
            print(f"{name}: {label}: {value:.2f} {unit}", file=sys.stderr, flush=True)
    finally:
        proc.kill()
        proc.wait()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel-version", default="6.1")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--only", choices=["hotplug-vmm", "qemu-threads", "qemu-io_uring"])
    ap.add_argument("--append", default="", help="extra guest kernel parameters, e.g. idle=poll")
    ap.add_argument("--jobs", type=int, default=len(JOBS), help="run only the first N jobs")
    args = ap.parse_args()
    del JOBS[args.jobs:]
    kernel = os.path.join(CACHE, f"linux-{args.kernel_version}", "vmlinux")
    initrd = os.path.join(CACHE, "initramfs.cpio")
    cmdline = (default_cmdline() + " " + args.append).strip()
    tools, data = tools_image(), data_file()

    setups = []
    if args.only in (None, "hotplug-vmm"):
        setups.append(("hotplug-vmm", [
            VMM, "--kernel", kernel, "--initramfs", initrd, "--cmdline", cmdline, "--cpus", args.cpus,
            "--memory", args.memory, "--disk", f"path={data},id=data",
            "--disk", f"path={tools},id=tools,readonly=on"]))
    for aio in ("threads", "io_uring"):
        if args.only in (None, f"qemu-{aio}"):
            # -cpu host without arch-capabilities: PVM hosts refuse that MSR; QEMU's default
            # model does not boot this guest there (docs/guest-on-pvm.md).
            setups.append((f"qemu-{aio}", [
                "qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host,-arch-capabilities",
                "-m", args.memory, "-smp", args.cpus, "-nodefaults", "-no-user-config", "-nographic",
                "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                "-object", "iothread,id=io0",
                "-drive", f"file={data},if=none,id=d0,format=raw,aio={aio}",
                "-device", "virtio-blk-pci,drive=d0,iothread=io0,serial=data",
                "-drive", f"file={tools},if=none,id=t0,format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=t0,serial=tools"]))

    results = {}
    for name, cmd in setups:
        t0 = time.time()
        results[name] = run_setup(name, cmd, args.runtime)
        print(f"{name}: done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    names = [n for n, _ in setups]
    print(f"\nvirtio-blk, fio in the guest, Linux {args.kernel_version}, {args.cpus} vCPU(s), "
          f"{args.runtime} s per job, 1 GiB raw file in the host page cache")
    print("| | " + " | ".join(names) + " | ratio ours / QEMU's best |")
    print("| --- " * (len(names) + 2) + "|")
    for label, _, _, _, unit in JOBS:
        values = [results[n].get(label) for n in names]
        ours = results.get("hotplug-vmm", {}).get(label)
        qemu = [results[n].get(label) for n in names if n.startswith("qemu")]
        best = max((v for v in qemu if v), default=None)
        ratio = f"{ours / best:.2f}" if ours and best else "-"
        cells = " | ".join(f"{v:.1f} {unit}" if v else "-" for v in values)
        print(f"| {label} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
