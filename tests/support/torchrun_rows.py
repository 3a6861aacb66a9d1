"""The tagged result records of one torchrun job, the job asserted to have ended cleanly."""

from fxplan.runtime.launch import run_torchrun, tagged


def torchrun_rows(worker: str, nproc: int, args=(), timeout_s: float = 240, env=None) -> list:
    """Run `worker` on `nproc` gloo ranks; its `RESULT {json}` records, after asserting that the job
    exited 0 and wrote at least one (the end of stderr is the failure message otherwise)."""
    proc = run_torchrun(worker, nproc, args, timeout_s=timeout_s, env=env)
    rows = tagged(proc.stdout)
    assert proc.returncode == 0 and rows, proc.stderr[-3000:]
    return rows
