"""Which ranks of this job died: one daemon thread per process watches the other ranks on this host
(their pids, read from the job's key-value store) and prints `[fxplan rank R] lost rank(s) [..]` the
moment one's process is gone without having ended by itself.

Why a thread that prints at once, instead of the failing rank's exception handler: when a rank is
SIGKILLed, its peers' collectives fail, but torchrun's agent of the dead rank SIGTERMs its other
workers within its monitor interval (0.1 s by default), often before their exception reaches fxplan;
a rank that waits for its own error to print may never print. The thread sees the death within
POLL_S (a fifth of that interval), and ranks under the other agents are not signalled by the dead
rank's agent at all: their own agent stops them only after one of them fails or its rendezvous
breaks, which comes later still, so they name the lost rank. The order of deaths is kept: the rank
that died first is named alone, not together with the ranks its agent stopped after it.

A rank that ends by itself (its script returned, or it raised and printed its own error) marks its pid
in the store at interpreter exit, so it is not called lost. Ranks on other hosts cannot be probed.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

POLL_S = 0.02
MARK_WAIT_S = 0.02  # a peer's exit mark is written before it exits; this covers a slow store
STORE_TRIES = 5  # looks in a row the store may fail before the watch gives up (the job is ending)
EXIT_MARK_S = 0.5  # a store round trip takes milliseconds; an unreachable one must not hold the exit
_current: list = [None]  # the watch of the newest LockStep: every rank makes them in the same order
_thread: list = [None]
_stopping = threading.Event()  # set at interpreter exit: the watch ends before the interpreter does


class PeerWatch:
    def __init__(self, rank: int, world: int, store, space: int):
        self.rank, self.world, self._space, self._store = rank, world, space, store
        self.host, self.pid = socket.gethostname(), os.getpid()
        store.set(self._proc_key(rank), f"{self.host} {self.pid}")
        self.step = 0  # the step this rank is in, for the message
        self.lost: list[int] = []  # in the order their deaths were seen
        self._peers: dict[int, int] | None = None  # rank -> pid, this host's other ranks
        self._gone: set[int] = set()
        self._lock = threading.Lock()
        _current[0] = self
        if _thread[0] is None:
            atexit.register(_ended_by_itself)
            _thread[0] = threading.Thread(target=_watch, name="fxplan-peer-watch", daemon=True)
            _thread[0].start()

    def lost_peers(self, wait_s: float = 1.0) -> list[int]:
        """The ranks lost so far. A killed peer's sockets close while its process is still exiting, so
        a failed collective can reach this rank a moment before the peer shows as gone: look again for
        up to `wait_s` before answering none."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.poll(self._store)
            except Exception:  # noqa: BLE001 - a store hiccup: look again until the deadline
                pass
            if self.lost or time.monotonic() >= deadline:
                return list(self.lost)
            time.sleep(0.005)

    def poll(self, store) -> None:
        """Look once: peers gone since the last look, and not ended by themselves, are lost (printed)."""
        with self._lock:
            peers = self._peers if self._peers is not None else self._read_peers(store)
            gone = [r for r, pid in peers.items() if r not in self._gone and not _alive(pid)]
            if not gone:
                return
            time.sleep(MARK_WAIT_S)
            ended = {r: _ended(store, self.host, peers[r]) for r in gone}
            lost = [r for r in gone if ended[r] is False]
            self._gone.update(r for r in gone if ended[r] is not None)  # unknown: ask again next look
            if lost:
                self.lost += lost
                from fxplan.runtime.launch import say

                say(f"[fxplan rank {self.rank}] lost rank(s) {lost} during step {self.step}: their processes are "
                    f"gone without exiting (killed: SIGKILL, out of memory, or stopped by their launcher); the "
                    f"failures that follow on other ranks come from losing them", sys.stderr)

    def _read_peers(self, store) -> dict[int, int]:
        peers, complete = {}, True
        for r in range(self.world):
            key = self._proc_key(r)
            if not store.check([key]):
                complete = False  # not registered yet; a rank that never started a step cannot be probed
                continue
            host, pid = store.get(key).decode().split()
            if host == self.host and r != self.rank:
                peers[r] = int(pid)
        if complete:
            self._peers = peers
        return peers

    def _proc_key(self, rank: int) -> str:
        return f"fxplan/proc/{self._space}/{rank}"


def _watch() -> None:
    owner, store, failures = None, None, 0
    while not _stopping.wait(POLL_S):
        watch = _current[0]
        if watch is None:
            continue
        try:
            if owner is not watch or store is None:  # a client of its own: a client is not shared between threads
                owner, store = watch, watch._store.clone()
            watch.poll(store)
            failures = 0
        except Exception:  # noqa: BLE001 - a hiccup: a new client next look; a store that stays gone: stop
            store, failures = None, failures + 1
            if failures >= STORE_TRIES and _current[0] is watch:
                _current[0] = None


def _ended_by_itself() -> None:
    """At interpreter exit (a return or an exception, not a kill): peers must not call this rank lost,
    and ranks ending now are the job ending, not losses to report."""
    watch, _current[0] = _current[0], None
    # A daemon thread still inside a store call when the interpreter finalises is ended by
    # pthread_exit on its way back to the GIL; unwinding through the C++ binding's noexcept frames
    # then aborts the process ("terminate called without an active exception"). Let the watch
    # finish its look first (milliseconds; an unreachable store is waited for EXIT_MARK_S at most).
    _stopping.set()
    if _thread[0] is not None:
        _thread[0].join(EXIT_MARK_S)
    if watch is None:
        return

    def mark():
        try:
            key = _exit_key(watch.host, watch.pid)
            watch._store.set(key, "1")
            watch._store.check([key])  # a store write gets no answer: this round trip makes it land first
        except Exception:  # noqa: BLE001 - the store may be gone with the job
            pass

    # in a thread, so an unreachable store delays this process's exit by EXIT_MARK_S at most
    writer = threading.Thread(target=mark, name="fxplan-exit-mark", daemon=True)
    writer.start()
    writer.join(EXIT_MARK_S)


def _ended(store, host: str, pid: int) -> bool | None:
    """Whether the process marked its own exit; None when the store cannot tell (accuse no one yet)."""
    try:
        return bool(store.check([_exit_key(host, pid)]))
    except Exception:  # noqa: BLE001 - the store may be gone with the job, or answer the next look
        return None


def _exit_key(host: str, pid: int) -> str:
    return f"fxplan/exited/{host}/{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its torchrun agent) is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
