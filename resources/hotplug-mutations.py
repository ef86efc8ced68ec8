#!/usr/bin/env python3
"""Breaks one rule of the hot-plug control plane at a time and runs its tests: every mutation
must make a test fail. Run from the repository root: python3 resources/hotplug-mutations.py
[NAME...]. Restores devices/src/hotplug/control.rs afterwards (and on Ctrl-C).

Last run 2026-12-04: all 12 caught (see docs/control-plane.md)."""
import subprocess
import sys

PATH = "devices/src/hotplug/control.rs"

MUTATIONS = {
    "busy-refusal-removed": (
        ".is_some_and(|v| v.power_indicator == Indicator::Blinking)",
        ".is_some_and(|v| v.power_indicator == Indicator::Blinking && false)",
    ),
    "repeat-window-removed": (
        "if ago < self.options.repress_after {",
        "if ago < Duration::ZERO {",
    ),
    "release-at-power-off": (
        "                let request = f.request().copied();\n",
        "                let request = f.request().copied();\n"
        "                f.lifecycle = Lifecycle::PoweredOff { since: now, request };\n"
        "                self.release_powered_off(key, &mut actions);\n"
        "                return actions;\n",
    ),
    "blockdev-del-ignores-users": (
        "        if let Some(user) = self.node_user(node) {",
        "        if let Some(user) = self.node_user(node).filter(|_| false) {",
    ),
    "eject-deleted-twice": (
        "            actions.push(Action::Emit(Event::DeviceDeleted { id: f.id }));\n        }\n        actions\n    }\n\n    fn on_backend_failed(",
        "            actions.push(Action::Emit(Event::DeviceDeleted { id: f.id.clone() }));\n"
        "            actions.push(Action::Emit(Event::DeviceDeleted { id: f.id }));\n        }\n        actions\n    }\n\n    fn on_backend_failed(",
    ),
    "surprised-power-off-not-ignored": (
        "SlotEvent::PowerOff if self.surprised_ports.remove(&port) => {}",
        "SlotEvent::PowerOff if self.surprised_ports.remove(&port) && false => {}",
    ),
    "occupied-slot-not-refused": (
        "        if let Some(f) = self.occupant(slot) {\n            return Err(HotplugError::SlotOccupied {\n                slot: slot_name(slot),\n                occupant: f.id.clone(),\n            });\n        }\n        let busy",
        "        let busy",
    ),
    "acpi-release-at-request": (
        "        Ok(vec![action])\n    }",
        "        if let Action::RequestEject { .. } = action {\n"
        "            let f = self.functions.remove(&key).unwrap();\n"
        "            return Ok(vec![action, Action::Release { key, id: f.id.clone(), slot, cause: ReleaseCause::Ejected { requested: true } }, Action::Emit(Event::DeviceDeleted { id: f.id })]);\n"
        "        }\n        Ok(vec![action])\n    }",
    ),
    "refused-add-changes-state": (
        "        if let Some(user) = self.node_user(&add.drive) {",
        "        self.next_key += 1;\n        if let Some(user) = self.node_user(&add.drive) {",
    ),
    "vanished-slot-reused": (
        "if bus.vanished & 1 << device != 0 {",
        "if bus.vanished & 1 << device != 0 && false {",
    ),
    "stall-reported-every-tick": (
        "if r.stall_reported || now.saturating_sub(r.since)",
        "if now.saturating_sub(r.since)",
    ),
    "recheck-presses-when-blinking": (
        "if view.powered && view.power_indicator == Indicator::On && !view.attention_pressed {",
        "if view.powered && !view.attention_pressed {",
    ),
}


def main():
    original = open(PATH).read()
    names = sys.argv[1:] or list(MUTATIONS)
    missed = []
    try:
        for name in names:
            old, new = MUTATIONS[name]
            if original.count(old) != 1:
                sys.exit(f"{name}: the code it mutates is no longer there; update the script")
            with open(PATH, "w") as f:
                f.write(original.replace(old, new))
            r = subprocess.run(["cargo", "test", "-q", "-p", "hotplug-vmm-devices", "hotplug"],
                               capture_output=True, text=True)
            out = r.stdout + r.stderr
            failed = [l.split()[1] for l in out.splitlines() if l.startswith("---- ")]
            if "error[" in out:
                verdict = "does not compile (fix the mutation)"
                missed.append(name)
            elif failed:
                verdict = "caught by " + ", ".join(t.rsplit("::", 1)[-1] for t in failed)
            else:
                verdict = "NOT CAUGHT"
                missed.append(name)
            print(f"{name}: {verdict}", flush=True)
    finally:
        with open(PATH, "w") as f:
            f.write(original)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
