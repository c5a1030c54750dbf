"""Ends a local Ray with the driver that started it, also when the driver is killed (SIGKILL, OOM killer).

`ray.init()` on a machine without a cluster starts Ray's processes (GCS, raylet, dashboard and runtime-env
agents, workers) as the driver's descendants; a driver that exits cleanly stops them, but one killed by a signal
it cannot catch leaves some behind (seen with Ray 2.60: `ray::DashboardAgent`, `ray::RuntimeEnvAgent`). The
reaper is a small process started beside the driver once `ray.init` returns: while the driver lives it follows
the processes `ray.init` started and their descendants (pid and start time, so a reused pid is never touched);
once the driver is gone it stops exactly those (SIGTERM, then SIGKILL after a grace period) and exits. Nothing
else, the driver's other children included, is ever signalled.

Linux only (it reads /proc); elsewhere `start_reaper` does nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])          # ppid (field 4), starttime (field 22)


def descendants(*roots: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of the `roots` (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
                starts[int(entry)] = stat[1]
    found, todo = {}, [c for root in roots for c in children.get(root, [])]
    while todo:
        pid = todo.pop()
        if pid not in found and pid in starts:
            found[pid] = starts[pid]
            todo += children.get(pid, [])
    return found


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def reap(driver: int, driver_start: int, roots: dict[int, int]) -> int:
    """Watch `driver`; while it lives, follow `roots` ({pid: start time}, the processes `ray.init` started) and
    their descendants; once it is gone, stop those. Returns how many were signalled."""
    known = dict(roots)
    while _alive(driver, driver_start):
        known = {pid: start for pid, start in known.items() if _alive(pid, start)}
        if not known:              # Ray was shut down while the driver lives: nothing left to guard
            return 0
        known.update(descendants(*known))
        time.sleep(POLL_S)
    me = os.getpid()
    targets = {pid: start for pid, start in known.items() if pid != me and _alive(pid, start)}
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        for pid, start in targets.items():
            if _alive(pid, start):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and any(_alive(p, s) for p, s in targets.items()):
            time.sleep(0.1)
    return len(targets)


def start_reaper(before: dict[int, int]) -> subprocess.Popen | None:
    """After `ray.init` started a local Ray: start the reaper for the processes that are this driver's
    descendants now and were not in `before` (`descendants(os.getpid())` taken just before `ray.init`). It runs
    in its own session, so a signal to the driver's process group does not reach it. None without /proc."""
    me = os.getpid()
    stat = _stat(me)
    if stat is None:
        return None
    roots = {pid: start for pid, start in descendants(me).items() if before.get(pid) != start}
    args = [f"{pid}:{start}" for pid, start in roots.items()]
    return subprocess.Popen([sys.executable, "-m", "actors.reaper", str(me), str(stat[1]), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def driver_descendants() -> dict[int, int]:
    """This process's descendants now ({} without /proc): what `start_reaper` must leave alone."""
    return descendants(os.getpid()) if os.path.isdir("/proc") else {}


if __name__ == "__main__":
    reap(int(sys.argv[1]), int(sys.argv[2]),
         {int(p): int(s) for p, s in (arg.split(":") for arg in sys.argv[3:])})
