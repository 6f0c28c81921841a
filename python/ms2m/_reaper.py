"""The reaper: what removes a driver's testbeds when the driver dies without closing them.

One per driver process, started with its first testbed as a process of its own session (a
signal to the driver's process group does not reach it). It holds the read end of a pipe
whose write end only the driver holds: when the driver ends, however it ends (SIGKILL, SIGTERM,
a Jupyter kernel restarted), the kernel closes that end and the read returns. The reaper then
removes what ms2m runs whose owner is gone (``ms2m.cleanup()``: containers, networks, local
processes, temporary directories), as testcontainers' Ryuk does for its sessions, and exits. A
driver that closed its testbeds leaves nothing for it to remove.

Not started with ``TESTCONTAINERS_COMMAND=keep``, which asks for the containers to outlive
the driver.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

_started: subprocess.Popen[bytes] | None = None
_lock = threading.Lock()


def ensure_started() -> None:
    """Starts this process's reaper, once (not with ``TESTCONTAINERS_COMMAND=keep``)."""
    global _started
    if os.environ.get("TESTCONTAINERS_COMMAND") == "keep":
        return
    with _lock:
        if _started is not None and _started.poll() is None:
            return
        try:
            _started = subprocess.Popen(
                [sys.executable, "-m", "ms2m._reaper", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            # Best effort: without a reaper the testbed still works, and `python -m ms2m
            # cleanup` removes what a killed driver leaves.
            warnings.warn(
                f"ms2m: no reaper ({e}); if this process is killed, run `python -m ms2m cleanup`",
                stacklevel=3,
            )


def _watch(owner: int) -> int:
    # Returns at EOF: the owner, the only writer, has ended (or closed it on purpose).
    sys.stdin.buffer.read()
    # The owner's pid must be gone from /proc before cleanup counts its resources as orphans.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{owner}") and time.monotonic() < deadline:
        time.sleep(0.05)
    from ._native import cleanup

    cleanup(all=False)
    return 0


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1])))
