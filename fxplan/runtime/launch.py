"""Launch a script under torchrun, for the tests and the demo.

    python -m torch.distributed.run --standalone --nproc-per-node N script.py ARGS...

Runs in its own process group (session) so that a timeout kills torchrun AND its workers: a hung
multi-process test must fail by itself, never hang CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Mapping, Sequence, TextIO


def torchrun_command(script: str, nproc: int, args: Sequence[str] = ()) -> list[str]:
    """The exact command line `run_torchrun` executes (printed by the demo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            str(script), *map(str, args)]


def say(line: str, stream: TextIO | None = None) -> None:
    """Write `line` and its newline in ONE write to the stream's file descriptor.

    Every rank of a torchrun job shares one pipe; print() writes the text and the newline
    separately (each its own syscall when Python runs unbuffered), so two ranks' lines can
    splice. A single write of at most PIPE_BUF bytes is atomic on a pipe.
    """
    stream = stream or sys.stdout
    data = (line + "\n").encode()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # captured or in-memory stream: no descriptor
        stream.write(line + "\n")
        stream.flush()
        return
    stream.flush()
    while data:
        data = data[os.write(fd, data):]


def tagged(output: str, tag: str = "RESULT") -> list:
    """The JSON records of every `TAG {json}` line `say` wrote into `output`, in order."""
    head = tag + " "
    return [json.loads(line[len(head):]) for line in output.splitlines() if line.startswith(head)]


def run_torchrun(script: str, nproc: int, args: Sequence[str] = (), timeout_s: float = 300,
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` local processes; return the CompletedProcess (stdout, stderr as text).

    On timeout the whole process group is killed and the result has returncode -9 and a line
    "fxplan.launch: timed out after S s" appended to stderr (no exception: callers assert on it).
    """
    full_env = dict(os.environ)
    # One thread per worker: N workers on a small box would otherwise oversubscribe the cores.
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    # Workers import fxplan from the checkout this file lives in, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "fxplan", "__init__.py")):
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH", "")) if p)
    cmd = torchrun_command(script, nproc, args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a pipe still held open: give up on the rest of the output
            out, err = "", ""
        err = (err or "") + f"\nfxplan.launch: timed out after {timeout_s} s\n"
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, out, err)
    except BaseException:
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    # Only what this call started: torchrun (its own session, so its id is the group id) and every
    # descendant, found before killing (torchrun may start workers in sessions of their own).
    victims = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out
