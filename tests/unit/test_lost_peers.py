"""Naming a lost rank without a process group: a peer process registered in a store, then killed, is
named at once (also when it dies while the failure that asked is already waiting); one that marked its
own exit is not; one on another host is not probed; live peers are not named after the wait."""

from __future__ import annotations

import subprocess
import sys
import time

import torch.distributed as dist

from fxplan.runtime import peer_watch
from fxplan.runtime.peer_watch import PeerWatch


def _peer():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_killed_peer_is_named_and_one_that_exited_by_itself_is_not(capfd):
    store = dist.HashStore()
    killed, ended, remote = _peer(), _peer(), _peer()
    watch = PeerWatch(0, 4, store, space=9001)
    host = watch.host
    store.set("fxplan/proc/9001/1", f"{host} {killed.pid}")
    store.set("fxplan/proc/9001/2", f"{host} {ended.pid}")
    store.set("fxplan/proc/9001/3", f"elsewhere {remote.pid}")  # other hosts cannot be probed
    try:
        watch.step = 2
        assert watch.lost_peers(wait_s=0.05) == []
        store.set(f"fxplan/exited/{host}/{ended.pid}", "1")  # what its exit handler writes
        ended.kill()
        ended.wait()
        killed.kill()
        killed.wait()
        remote.kill()
        remote.wait()
        start = time.monotonic()
        assert watch.lost_peers(wait_s=2.0) == [1]
        assert time.monotonic() - start < 1.0
        err = capfd.readouterr().err
        assert "[fxplan rank 0] lost rank(s) [1] during step 2" in err and "SIGKILL" in err
        assert watch.lost_peers(wait_s=0.05) == [1]  # named once, not again
        assert capfd.readouterr().err.count("lost rank(s)") == 0
    finally:
        peer_watch._current[0] = None
        for p in (killed, ended, remote):
            if p.poll() is None:
                p.kill()


def test_the_thread_names_a_killed_peer_without_being_asked(capfd):
    store = dist.HashStore()
    victim = _peer()
    watch = PeerWatch(0, 2, store, space=9002)
    store.set("fxplan/proc/9002/1", f"{watch.host} {victim.pid}")
    try:
        time.sleep(5 * peer_watch.POLL_S)
        victim.kill()
        deadline = time.monotonic() + 2.0
        while not watch.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.lost == [1]
        assert "lost rank(s) [1]" in capfd.readouterr().err
    finally:
        peer_watch._current[0] = None
        victim.kill()
        victim.wait()


CHILD = """
import sys, time
import torch.distributed as dist
from fxplan.runtime.peer_watch import PeerWatch
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
PeerWatch(int(sys.argv[2]), 3, store, space=9003)
print("up", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_a_peer_that_returns_marks_its_exit_and_one_killed_does_not(capfd):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    watch = PeerWatch(0, 3, store, space=9003)
    ends = subprocess.Popen([sys.executable, "-c", CHILD, str(store.port), "1", "0.5"], stdout=subprocess.PIPE)
    killed = subprocess.Popen([sys.executable, "-c", CHILD, str(store.port), "2", "60"], stdout=subprocess.PIPE)
    try:
        assert ends.stdout.readline() == b"up\n" and killed.stdout.readline() == b"up\n"
        ends.wait(timeout=30)  # returned by itself: its exit handler marked it
        killed.kill()
        killed.wait()
        assert watch.lost_peers(wait_s=2.0) == [2]
        err = capfd.readouterr().err
        assert "lost rank(s) [2]" in err and "[1]" not in err
    finally:
        peer_watch._current[0] = None
        for p in (ends, killed):
            if p.poll() is None:
                p.kill()


def _watch(pids: dict[int, int], world: int, space: int) -> PeerWatch:
    store = dist.HashStore()
    watch = PeerWatch(0, world, store, space=space)
    for r, pid in pids.items():
        store.set(f"fxplan/proc/{space}/{r}", f"{watch.host} {pid}")
    return watch


def test_a_peer_that_exits_within_the_wait_is_named_and_live_ones_are_not():
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        watch = _watch({1: live.pid, 2: dying.pid}, world=3, space=9004)
        assert watch.lost_peers(wait_s=0.0) == []  # both still running when asked at once
        start = time.monotonic()
        assert watch.lost_peers(wait_s=10.0) == [2]  # a zombie (not yet reaped) counts as gone
        assert time.monotonic() - start < 5.0
    finally:
        peer_watch._current[0] = None
        for p in (live, dying):
            p.kill()
            p.wait()


def test_no_lost_peer_answers_after_the_wait():
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watch = _watch({1: live.pid}, world=2, space=9005)
        start = time.monotonic()
        assert watch.lost_peers(wait_s=0.3) == []
        assert 0.3 <= time.monotonic() - start < 3.0
    finally:
        peer_watch._current[0] = None
        live.kill()
        live.wait()


class _FlakyStore:
    """A HashStore whose `check` fails the first `failures` times: a store round trip that broke once."""

    def __init__(self, failures: int):
        self._store, self.failures = dist.HashStore(), failures

    def __getattr__(self, name):
        return getattr(self._store, name)

    def clone(self):
        return self

    def check(self, keys):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("connection reset by peer")
        return self._store.check(keys)


def test_a_store_error_while_a_peer_is_gone_delays_naming_it_but_does_not_forget_it(capfd):
    victim = _peer()
    store = _FlakyStore(failures=0)
    watch = PeerWatch(0, 2, store, space=9006)
    store.set("fxplan/proc/9006/1", f"{watch.host} {victim.pid}")
    try:
        assert watch.lost_peers(wait_s=0.0) == []  # registered and alive: the peers are read
        peer_watch._current[0] = None  # the thread must not look in between: this test looks itself
        store.failures = 3
        victim.kill()
        victim.wait()
        assert watch.lost_peers(wait_s=2.0) == [1]
        assert store.failures == 0 and "lost rank(s) [1]" in capfd.readouterr().err
    finally:
        peer_watch._current[0] = None
        if victim.poll() is None:
            victim.kill()
