#!/usr/bin/env python3
"""Smoke test of the QMP socket with the reference client, qemu.qmp (pip install qemu.qmp).

Usage: qmp_smoke.py SOCKET

Checks that QMPClient accepts the greeting, negotiates capabilities and runs query-version,
query-commands and an unknown command (which must fail with CommandNotFound). When the server
offers `device_del` and answers `device_del {"id": "disk1"}` with DEVICE_DELETED (as the VMM's
unit-test server does), it also checks that the event reaches two clients.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(path: str) -> None:
    a = QMPClient("smoke-a")
    b = QMPClient("smoke-b")
    await a.connect(path)
    await b.connect(path)
    greeting = a.greeting
    assert greeting is not None
    print("greeting:", greeting._asdict())

    version = await a.execute("query-version")
    print("query-version:", version)
    assert version["qemu"]["major"] >= 8, version

    names = {c["name"] for c in await a.execute("query-commands")}
    print("query-commands:", sorted(names))
    assert {"qmp_capabilities", "query-version"} <= names

    try:
        await a.execute("no-such-command")
        raise AssertionError("unknown command succeeded")
    except ExecuteError as err:
        print("unknown command:", err.error_class, "-", err.error.error.desc)
        assert err.error_class == "CommandNotFound"

    try:
        await a.execute("qmp_capabilities")
        raise AssertionError("second qmp_capabilities succeeded")
    except ExecuteError as err:
        assert err.error_class == "CommandNotFound"

    if "device_del" in names:
        with a.listener("DEVICE_DELETED") as la, b.listener("DEVICE_DELETED") as lb:
            await a.execute("device_del", {"id": "disk1"})
            for name, listener in (("a", la), ("b", lb)):
                event = await asyncio.wait_for(listener.get(), 5)
                print(f"event on {name}:", dict(event))
                assert event["event"] == "DEVICE_DELETED", event
                assert event["data"]["device"] == "disk1", event

    # Both still work after all that.
    assert (await b.execute("query-version")) == version
    await a.disconnect()
    await b.disconnect()
    print("qemu.qmp smoke test: OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
