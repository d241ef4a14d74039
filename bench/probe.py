"""A timestamping pipe stage: `python probe.py in|out LOG`.

The benchmark's run scripts put one probe on each side of the emulator
(`probe in | ax-emulator ... | probe out`). A probe copies its stdin to its stdout chunk by chunk
(one read, one write, nothing parsed) and then appends `<CLOCK_MONOTONIC ns> <hex bytes>` to LOG.
The `out` probe is thus a raw reader of the runner's stdout: the time it records is when the
runner's flushed write became readable, before the daemon could see it. The `in` probe records
when the daemon's prompt line reached the runner's stdin.
"""
from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    side, log_path = sys.argv[1], sys.argv[2]
    # The daemon sends SIGINT to its runner's first process; a probe is never the one to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = open(log_path, "a", buffering=1)
    read_fd, write_fd = 0, 1
    while True:
        try:
            data = os.read(read_fd, 65536)
        except OSError:
            break
        now = time.monotonic_ns()
        if not data:
            break
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]
        except OSError:
            break
        log.write(f"{now} {data.hex()}\n")
    log.close()
    if side == "in":
        os.close(write_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
