#!/usr/bin/env python3
"""The virtio-blk data path with no guest, beside the host's limit and QEMU's block layer.

Usage: bench-datapath.py [--runtime SECS] [--file PATH] [--size-mib N] [--quick]
                         [--formats raw,qcow2] [--json OUT.json] [--png OUT.png]

For every row of the matrix — 4k random read/write at depth 1 and 32, 128k sequential
read/write at depth 16; 1 and 4 queues; O_DIRECT and buffered; raw, and qcow2 with one queue
(the same data converted by `qemu-img convert -O qcow2`, every cluster allocated) — it runs, on
the same image:

- hotplug-vmm's device, driven by host threads playing the driver
  (`devices/examples/blk_bench.rs`: one thread and one virtqueue per queue);
- fio with the same block size, depth and jobs (one per queue), engine io_uring: what the
  host itself does (on the raw image for the qcow2 rows too: the limit of the storage);
- `qemu-img bench` with the same block size and depth, aio io_uring, cache none or writeback:
  QEMU's block layer. It has one queue and no random pattern: its rows are sequential.

Then the notification floor (an eventfd ping-pong between two threads) and, at depth 1 on
the page cache, the device's own time per request above the host's I/O and that floor.
Prints a Markdown table with the ratios; writes the figures as JSON and a plot (PNG, with
matplotlib, installed into the harness's Python cache if missing).

Needs fio and qemu-img (Debian: apt-get install fio qemu-utils).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("HOTPLUG_VMM_CACHE", os.path.expanduser("~/.cache/hotplug-vmm"))

# (rw, block size, depth)
SHAPES = [
    ("randread", 4096, 1),
    ("randwrite", 4096, 1),
    ("randread", 4096, 32),
    ("randwrite", 4096, 32),
    ("read", 131072, 16),
    ("write", 131072, 16),
]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def build():
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "hotplug-vmm-devices",
         "--example", "blk_bench"],
        cwd=ROOT, check=True)
    return os.path.join(ROOT, "target/release/examples/blk_bench")


def make_image(path, size_mib):
    if os.path.exists(path) and os.path.getsize(path) == size_mib << 20:
        return
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def make_qcow2(raw, path):
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(raw):
        return
    sh(["qemu-img", "convert", "-O", "qcow2", raw, path])


def ours(binary, image, rw, bs, qd, queues, direct, runtime):
    cmd = [binary, "--file", image, "--rw", rw, "--bs", str(bs), "--qd", str(qd),
           "--queues", str(queues), "--runtime", str(runtime)]
    if direct:
        cmd.append("--direct")
    r = json.loads(sh(cmd))
    assert r["errors"] == 0, r
    return r


def fio(image, rw, bs, qd, queues, direct, runtime, engine="io_uring"):
    out = sh(["fio", "--name=bench", f"--filename={image}", f"--rw={rw}", f"--bs={bs}",
              f"--iodepth={qd}", f"--ioengine={engine}", f"--direct={int(direct)}",
              f"--numjobs={queues}", "--group_reporting", "--time_based",
              f"--runtime={runtime}", "--randrepeat=0", "--norandommap", "--invalidate=0",
              "--output-format=json"])
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    pct = side["clat_ns"].get("percentile", {})
    # fio's clat is from submission to completion; add its submission latency for like with like.
    slat = side.get("slat_ns", {}).get("mean", 0.0)
    return {
        "engine": "fio",
        "iops": side["iops"],
        "p50_us": (pct.get("50.000000", 0) + slat) / 1000,
        "p99_us": (pct.get("99.000000", 0) + slat) / 1000,
    }


def qemu_img(image, rw, bs, qd, direct, iops_hint, runtime, fmt="raw"):
    count = max(1000, int(iops_hint * runtime))
    cmd = ["qemu-img", "bench", "-f", fmt, "-c", str(count), "-d", str(qd), "-s", str(bs),
           "-t", "none" if direct else "writeback", "-i", "io_uring"]
    if "write" in rw:
        cmd.append("-w")
    out = sh(cmd + [image])
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
    return {"engine": "qemu-img bench", "iops": count / secs, "sequential": True}


def median_run(runs):
    """The run with the median IOPS (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r["iops"])
    return ordered[(len(ordered) - 1) // 2]


def floor(binary):
    runs = [json.loads(sh([binary, "--floor"]))["p50_us"] for _ in range(3)]
    return statistics.median(runs)


def goal_fio(qd, direct):
    return 0.9 if (qd > 1 or direct) else None


def plot(rows, path):
    pylib = os.path.join(CACHE, "pylib")
    sys.path.insert(0, pylib)
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", pylib,
                        "matplotlib"], check=True)
        sys.path.insert(0, pylib)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 5))
    w = 0.27
    ax.bar([i - w for i in x], [r["ours"]["iops"] / 1000 for r in rows], w, label="hotplug-vmm")
    ax.bar(list(x), [r["fio"]["iops"] / 1000 for r in rows], w, label="host fio (io_uring)")
    ax.bar([i + w for i in x], [r["qemu"]["iops"] / 1000 if r["qemu"] else 0 for r in rows], w,
           label="qemu-img bench")
    ax.set_yscale("log")
    ax.set_ylabel("thousand requests per second (log)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.legend()
    ax.set_title("virtio-blk data path, no guest: device vs host vs QEMU's block layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--file", default="/var/tmp/hotplug-vmm-bench.img",
                    help="the image (on a file system with O_DIRECT: not tmpfs)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="one queue, depth-32 and QD1 rows only")
    ap.add_argument("--formats", default="raw,qcow2",
                    help="image formats (qcow2 rows have one queue)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each tool per row, taking turns; the median is kept")
    ap.add_argument("--json")
    ap.add_argument("--png")
    a = ap.parse_args()
    for tool in ("fio", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"bench-datapath.py: {tool} is missing (apt-get install fio qemu-utils)")
    binary = build()
    make_image(a.file, a.size_mib)
    qcow2 = os.path.splitext(a.file)[0] + ".qcow2"
    formats = a.formats.split(",")
    if "qcow2" in formats:
        make_qcow2(a.file, qcow2)
    rows = []
    queue_counts = [1] if a.quick else [1, 4]
    shapes = [s for s in SHAPES if not a.quick or s[1] == 4096]
    matrix = [(fmt, direct, queues) for fmt in formats for direct in (True, False)
              for queues in (queue_counts if fmt == "raw" else [1])]
    for fmt, direct, queues in matrix:
        image = a.file if fmt == "raw" else qcow2
        for rw, bs, qd in shapes:
            label = (f"{rw} {bs // 1024}k QD{qd} {queues}q {'direct' if direct else 'buffered'}"
                     + ("" if fmt == "raw" else " qcow2"))
            # Each row starts alike: no dirty pages left to throttle its writes, and for
            # buffered rows the image in the page cache (O_DIRECT writes invalidate it).
            sh(["sync"])
            if not direct:
                for f in {image, a.file}:
                    sh(["dd", f"if={f}", "of=/dev/null", "bs=1M"])
            # The host's storage drifts (a VM's virtual disk here: fio's own figure moved
            # 2.5x between two runs of a row), so each tool runs --repeat times, taking
            # turns, and each keeps its median run.
            runs = {"ours": [], "fio": [], "qemu": []}
            for _ in range(a.repeat):
                o = ours(binary, image, rw, bs, qd, queues, direct, a.runtime)
                runs["ours"].append(o)
                runs["fio"].append(fio(a.file, rw, bs, qd, queues, direct, a.runtime))
                if queues == 1:
                    runs["qemu"].append(
                        qemu_img(image, rw, bs, qd, direct, o["iops"], a.runtime, fmt))
            o, f = median_run(runs["ours"]), median_run(runs["fio"])
            q = median_run(runs["qemu"]) if runs["qemu"] else None
            rows.append({"label": label, "rw": rw, "bs": bs, "qd": qd, "queues": queues,
                         "direct": direct, "format": fmt, "ours": o, "fio": f, "qemu": q})
            print(f"{label}: ours {o['iops']:.0f}/s, fio {f['iops']:.0f}/s"
                  + (f", qemu-img {q['iops']:.0f}/s" if q else ""), file=sys.stderr)
    fl = floor(binary)
    # The host's own cost of a 4k read from the page cache: one pread, no wake-up.
    sh(["dd", f"if={a.file}", "of=/dev/null", "bs=1M"])
    host_read = fio(a.file, "randread", 4096, 1, 1, False, a.runtime, engine="psync")

    print(f"\nNotification floor (eventfd ping-pong between two threads, p50): {fl:.1f} us\n")
    print("| row | hotplug-vmm IOPS | p50 / p99 us | fio IOPS | p50 / p99 us | ratio to fio (goal) "
          "| qemu-img bench IOPS (sequential) | ratio to qemu-img (goal 1.0) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        o, f, q = r["ours"], r["fio"], r["qemu"]
        g = goal_fio(r["qd"], r["direct"])
        cells = [
            r["label"],
            f"{o['iops']:.0f}",
            f"{o['p50_us']:.1f} / {o['p99_us']:.1f}",
            f"{f['iops']:.0f}",
            f"{f['p50_us']:.1f} / {f['p99_us']:.1f}",
            f"{o['iops'] / f['iops']:.2f} ({g if g else '-'})",
            f"{q['iops']:.0f}" if q else "n/a (one queue)",
            f"{o['iops'] / q['iops']:.2f}" if q else "n/a",
        ]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["qd"] == 1 and not r["direct"] and r["queues"] == 1 and r["rw"] == "randread":
            # The device polls after each wake-up that brought work, so at depth 1 it rarely
            # sleeps: what is left above the host's pread is the driver's own wake-up on the
            # interrupt and the device's work.
            print(f"\n{r['label']}: p50 {r['ours']['p50_us']:.1f} us; the host's pread "
                  f"(fio psync p50) {host_read['p50_us']:.1f} us; the notification floor "
                  f"(two wake-ups) {fl:.1f} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"floor_p50_us": fl, "host_pread": host_read, "rows": rows,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    if a.png:
        plot(rows, a.png)


if __name__ == "__main__":
    main()
