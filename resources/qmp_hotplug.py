#!/usr/bin/env python3
"""Hot-add or gracefully remove a virtio-blk disk with QEMU's own client library, qemu.qmp.

Usage:
  qmp_hotplug.py SOCKET add ID IMAGE BUS   blockdev-add (node ID) + device_add onto BUS (e.g. rp1)
  qmp_hotplug.py SOCKET del ID [TIMEOUT]   device_del, wait for DEVICE_DELETED, blockdev-del

Works unchanged against QEMU (with BUS a pcie-root-port id) and hotplug-vmm: that is the point.
Exits non-zero, with the error on stderr, if any step fails.
"""

import asyncio
import sys

from qemu.qmp import EventListener, QMPClient


async def add(qmp: QMPClient, dev_id: str, image: str, bus: str) -> None:
    await qmp.execute("blockdev-add", {
        "driver": "raw", "node-name": dev_id,
        "file": {"driver": "file", "filename": image},
    })
    await qmp.execute("device_add", {
        "driver": "virtio-blk-pci", "id": dev_id, "drive": dev_id, "bus": bus,
    })
    print(f"added {dev_id} on {bus}")


async def delete(qmp: QMPClient, dev_id: str, timeout: float) -> None:
    listener = EventListener("DEVICE_DELETED")
    with qmp.listen(listener):
        await qmp.execute("device_del", {"id": dev_id})

        async def deleted():
            async for event in listener:
                if event["event"] == "DEVICE_DELETED" and event["data"].get("device") == dev_id:
                    return event
        event = await asyncio.wait_for(deleted(), timeout)
    await qmp.execute("blockdev-del", {"node-name": dev_id})
    print(f"deleted {dev_id}: {dict(event)}")


async def main(argv) -> None:
    if len(argv) < 3 or argv[1] not in ("add", "del"):
        sys.exit(__doc__)
    qmp = QMPClient("qmp_hotplug")
    await qmp.connect(argv[0])
    try:
        if argv[1] == "add":
            await add(qmp, argv[2], argv[3], argv[4])
        else:
            await delete(qmp, argv[2], float(argv[3]) if len(argv) > 3 else 90.0)
    finally:
        await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
