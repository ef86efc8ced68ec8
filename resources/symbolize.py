#!/usr/bin/env python3
"""Adds kernel symbols to the RIPs in hotplug-vmm's stderr (vCPU samples, fatal exits), and to
the kernel text addresses a sample found on the guest's stack (a guessed call chain).

Usage: HOTPLUG_VMM_SAMPLE_MS=1000 hotplug-vmm ... 2>err.log; resources/symbolize.py vmlinux < err.log
"""
import bisect
import re
import subprocess
import sys

syms = []
for line in subprocess.run(["nm", "-n", sys.argv[1]], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1].lower() in "tw":
        syms.append((int(parts[0], 16), parts[2]))
addrs = [a for a, _ in syms]


def name(addr):
    i = bisect.bisect_right(addrs, addr) - 1
    return f"{syms[i][1]}+{addr - syms[i][0]:#x}" if i >= 0 else "?"


for line in sys.stdin:
    line = re.sub(r"RIP (0x[0-9a-f]+)", lambda m: f"RIP {m.group(1)} <{name(int(m.group(1), 16))}>", line)
    # A sample's stack words: kernel text addresses found on the stack, a guessed call chain.
    head, sep, stack = line.partition("; stack: ")
    if sep:
        line = head + sep + " ".join(f"<{name(int(w, 16))}>" for w in stack.split()) + "\n"
    print(line, end="")
