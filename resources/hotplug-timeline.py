#!/usr/bin/env python3
"""Turns a hotplug-vmm trace (--hotplug-trace FILE) into a readable timeline.

    hotplug-timeline.py TRACE [--dmesg FILE] [--no-reads] [--from T] [--to T]

Every line of the trace is one happening: a guest access to a hot-plug register (decoded into
its bits: Slot Control, Slot Status, Link Status of a root port; the ACPI hot-plug
controller's registers), a slot change, a control-socket request, reply or event. Repeated
identical reads (a driver polling) are folded into one line with a count.

With --dmesg, the guest's kernel log (lines as `dmesg` prints them, "[   12.345678] text") is
merged in by time: the guest's clock starts within a few tens of milliseconds of the trace's
(which starts when the VMM builds the machine), close enough to read cause and effect; shift
it with --dmesg-offset if needed.
"""

import argparse
import json
import re
import sys

# PCI Express Base Specification 5.0 §7.5.3.10 (Slot Control), §7.5.3.11 (Slot Status),
# §7.5.3.8 (Link Status).
SLTCTL_BITS = [
    (0, "ABPE"), (1, "PFDE"), (2, "MRLSCE"), (3, "PDCE"), (4, "CCIE"), (5, "HPIE"),
    (11, "EIC"), (12, "DLLSCE"),
]
SLTSTA_BITS = [
    (0, "ABP"), (1, "PFD"), (2, "MRLSC"), (3, "PDC"), (4, "CC"), (5, "MRLSS"), (6, "PDS"),
    (7, "EIS"), (8, "DLLSC"),
]
INDICATOR = {1: "on", 2: "blink", 3: "off", 0: "reserved"}


def bits(value, names):
    return [name for bit, name in names if value >> bit & 1]


def decode(register, value):
    """The bits of a register value, in words."""
    if register == "SLTCTL":
        words = bits(value, SLTCTL_BITS)
        words.append("AIC=" + INDICATOR[value >> 6 & 3])
        words.append("PIC=" + INDICATOR[value >> 8 & 3])
        words.append("power=" + ("off" if value >> 10 & 1 else "on"))
        return " ".join(words)
    if register == "SLTSTA":
        return " ".join(bits(value, SLTSTA_BITS)) or "-"
    if register == "LNKSTA":
        return "link " + ("up (DLLLA)" if value >> 13 & 1 else "down")
    if register == "SELECT":
        return "bus %d" % value
    if register in ("INSERT", "REMOVE", "EJECT", "BUS_CHECK"):
        slots = ["%02x" % d for d in range(32) if value >> d & 1]
        return ("slots " + ",".join(slots)) if slots else "-"
    if register == "PENDING":
        buses = [str(b) for b in range(32) if value >> b & 1]
        return ("buses " + ",".join(buses)) if buses else "-"
    return ""


def describe(rec):
    """(who, text) for one trace record."""
    kind = rec.get("kind")
    if kind in ("guest-read", "guest-write"):
        reg = rec["register"]
        value = int(rec["value"], 16)
        if kind == "guest-read":
            return rec["device"], "guest reads  %-9s %s  [%s]" % (reg, rec["value"], decode(reg, value))
        after = int(rec["after"], 16)
        return rec["device"], "guest writes %-9s %s  [%s]  -> %s  [%s]" % (
            reg, rec["value"], decode(reg, value), rec["after"], decode(reg, after))
    if kind == "slot":
        dev = " (%s)" % rec["device"] if rec.get("device") else ""
        value = rec.get("value")
        if isinstance(value, dict):
            value = " ".join("%s=%s" % kv for kv in value.items())
        return rec["bus"], "slot: %s %s%s" % (rec["change"], value, dev)
    if kind == "qmp-request":
        args = json.dumps(rec.get("arguments") or {}, separators=(",", ":"))
        return "qmp", "-> %s %s" % (rec["command"], args)
    if kind == "qmp-reply":
        if rec.get("ok"):
            return "qmp", "<- %s ok" % rec["command"]
        return "qmp", "<- %s ERROR %s" % (rec["command"], rec.get("error"))
    if kind == "qmp-event":
        data = json.dumps(rec.get("data") or {}, separators=(",", ":"))
        return "qmp", "<- event %s %s" % (rec["event"], data)
    return "?", json.dumps(rec)


DMESG = re.compile(r"^\x01?\[\s*(\d+\.\d+)\]\s?(.*)$")  # \x01: a console capture


def read_dmesg(path, offset):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = DMESG.match(line.rstrip("\n"))
            if m:
                out.append((float(m.group(1)) + offset, "guest", "dmesg: " + m.group(2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--dmesg", help="guest kernel log to merge in")
    ap.add_argument("--dmesg-offset", type=float, default=0.0,
                    help="seconds to add to dmesg times (default 0)")
    ap.add_argument("--no-reads", action="store_true", help="leave out guest register reads")
    ap.add_argument("--no-queries", action="store_true",
                    help="leave out query-* and x-query-* requests and replies")
    ap.add_argument("--from", dest="start", type=float, default=None, help="start at T seconds")
    ap.add_argument("--to", dest="end", type=float, default=None, help="end at T seconds")
    args = ap.parse_args()

    rows = []
    with open(args.trace) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print("%s:%d: not JSON, skipped" % (args.trace, n), file=sys.stderr)
                continue
            if args.no_reads and rec.get("kind") == "guest-read":
                continue
            if args.no_queries and "query" in str(rec.get("command", "")):
                continue
            who, text = describe(rec)
            rows.append((float(rec.get("t", 0.0)), who, text))
    if args.dmesg:
        rows.extend(read_dmesg(args.dmesg, args.dmesg_offset))
    rows.sort(key=lambda r: r[0])

    last = None
    repeats = 0

    def flush():
        if repeats:
            print("%12s  %-12s   (same read %d more times, until %.6f)" % ("", "", repeats, last[0]))

    for row in rows:
        t, who, text = row
        if args.start is not None and t < args.start:
            continue
        if args.end is not None and t > args.end:
            continue
        if last is not None and "guest reads" in text and (who, text) == last[1:]:
            repeats += 1
            last = row
            continue
        flush()
        repeats = 0
        print("%12.6f  %-12s %s" % (t, who, text))
        last = row
    flush()


if __name__ == "__main__":
    main()
