#!/usr/bin/python3
"""A disk image whose host side can fail: serves FILE as MOUNTPOINT/disk.img over FUSE.

    fuse-disk.py [--read-delay-ms N] [--gate PATH] FILE MOUNTPOINT

For trying what a VMM and its guest do when a disk's backend goes away, the way a network block
device does when its server dies:

- kill the process (SIGKILL): every access to the mounted file, open descriptors included,
  fails with ENOTCONN ("Transport endpoint is not connected") until it is unmounted;
- SIGUSR1: from then on every read, write and fsync fails with EIO (the daemon stays up);
  SIGUSR2 heals it.

--read-delay-ms makes every read take that long: a slow disk (network storage under load), on
which the guest always has requests waiting in the virtqueue — what a surprise removal's
in-flight policy acts on.

--gate PATH holds every read, write and fsync while PATH exists (checked every 10 ms): create
it, and the guest's requests pile up in the virtqueue, the one being served blocked in the
host's I/O; remove it, and they flow again. Tests use it to have a known number of requests in
flight when a disk is pulled, however slow the guest is.

Runs in the foreground, single-threaded; unmount with `fusermount -u MOUNTPOINT` or
`umount -l MOUNTPOINT`. Needs FUSE (/dev/fuse) and Debian's python3-fusepy.
"""

import argparse
import errno
import os
import signal
import stat
import sys
import time

try:
    from fusepy import FUSE, FuseOSError, Operations  # Debian's python3-fusepy
except ImportError:
    from fuse import FUSE, FuseOSError, Operations  # fusepy from PyPI

NAME = "/disk.img"


class OneFile(Operations):
    def __init__(self, path, read_delay, gate):
        self.fd = os.open(path, os.O_RDWR)
        self.read_delay = read_delay
        self.gate = gate
        self.failing = False
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "failing", True))
        signal.signal(signal.SIGUSR2, lambda *_: setattr(self, "failing", False))

    def _check(self):
        if self.failing:
            raise FuseOSError(errno.EIO)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        size = os.fstat(self.fd).st_size
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": size}

    def readdir(self, path, fh):
        return [".", "..", NAME[1:]]

    def open(self, path, flags):
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        return 0

    def _wait_gate(self):
        while self.gate and os.path.exists(self.gate):
            time.sleep(0.01)

    def read(self, path, size, offset, fh):
        self._check()
        self._wait_gate()
        if self.read_delay:
            time.sleep(self.read_delay)
        self._check()
        return os.pread(self.fd, size, offset)

    def write(self, path, data, offset, fh):
        self._check()
        self._wait_gate()
        self._check()
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        raise FuseOSError(errno.EPERM)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        self._check()
        self._wait_gate()
        self._check()
        os.fsync(self.fd)
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--read-delay-ms", type=float, default=0.0)
    ap.add_argument("--gate", help="reads, writes and fsyncs wait while this path exists")
    ap.add_argument("file")
    ap.add_argument("mountpoint")
    args = ap.parse_args()
    # direct_io: every access reaches the daemon (none is served from the page cache).
    disk = OneFile(args.file, args.read_delay_ms / 1000.0, args.gate)
    FUSE(disk, args.mountpoint, foreground=True, nothreads=True, direct_io=True)


if __name__ == "__main__":
    main()
