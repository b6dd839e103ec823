"""The processes of a build end with it, however it ends.

A build runs as one main process, its shard workers (a process pool) and, without a configured Prefect
API, a temporary Prefect server. Two rules keep them together:

- **Ctrl-C / SIGTERM** reach the main process, which alone decides: it kills the shard workers at once
  (a shard is written whole or not at all, so a killed worker loses only the shard in flight), lets the
  flow record the interruption, stops the server and exits with 128 + the signal number (130 for Ctrl-C).
  Workers ignore SIGINT and the server runs in a session of its own, so a terminal's Ctrl-C (sent to the
  whole foreground process group) cannot kill the server first and leave the flow retrying against it.
  Should the orderly stop take longer than :data:`GRACE_S`, the main process exits anyway.
- **The main process killed outright** (SIGKILL, the OOM killer): every worker and the server watch their
  parent and exit within :data:`WATCH_S` of losing it, so nothing keeps writing into the store.

``python -m flows.guard PARENT_PID MODULE ARGS...`` runs ``python -m MODULE ARGS...`` under such a watch.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

WATCH_S = 0.25  # how often a child looks for its parent
GRACE_S = 8.0  # longest orderly stop after a signal before the main process exits regardless

_spared: set[int] = set()  # children the signal handler must not kill (the server: stopped in order)


class BuildInterrupted(KeyboardInterrupt):
    """The build stopped on a signal; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def watch_parent(parent: int) -> None:
    """Exit this process (at once, without cleanup: nothing more is written) when ``parent`` is gone."""

    def watch() -> None:
        ev = threading.Event()
        while os.getppid() == parent:
            ev.wait(WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def guard_worker(parent: int) -> None:
    """Process-pool initializer of shard workers: leave SIGINT to the main process, die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent)


def spare(pid: int) -> None:
    """Keep child ``pid`` out of :func:`kill_workers` (it is stopped in order by its owner)."""
    _spared.add(pid)


def kill_workers() -> int:
    """SIGKILL every descendant of this process except spared ones and multiprocessing's resource
    tracker (it exits by itself with this process); returns how many were killed."""
    import psutil

    killed = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in _spared or "resource_tracker" in " ".join(child.cmdline()):
                continue
            child.kill()
            killed.append(child)
        except psutil.Error:  # already gone
            pass
    psutil.wait_procs(killed, timeout=2)  # reaped, not left as zombies
    return len(killed)


@contextmanager
def stop_on_signal(on_timeout=None) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`BuildInterrupted` in the main thread, after killing the
    workers; ``on_timeout()`` (e.g. stopping the server) runs before the forced exit should the orderly
    stop overrun :data:`GRACE_S`. Outside the main thread, does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hard_exit(signum: int) -> None:
        try:
            if on_timeout is not None:
                on_timeout()
        finally:
            sys.stderr.write(
                f"\nstopped ({signal.Signals(signum).name}); re-run the same command to resume\n"
            )
            sys.stderr.flush()
            os._exit(128 + signum)

    def handler(signum: int, frame) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # one stop at a time
        kill_workers()
        timer = threading.Timer(GRACE_S, hard_exit, args=(signum,))
        timer.daemon = True
        timer.start()
        raise BuildInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str]) -> None:
    parent, module, *rest = argv
    watch_parent(int(parent))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
