"""Run a function on W ranks of a CPU (gloo) process group, for the sharded-sites tests.

``run_ranks(fn, world, *args, timeout=...)`` spawns ``world`` fresh interpreters with
``torch.multiprocessing`` (spawn: no state forked from the test process), connects them on
loopback (``MASTER_ADDR=127.0.0.1``, a free port, gloo bound to ``lo`` where it exists), calls
``fn(rank, world, *args)`` on each and returns the ranks' return values in rank order. A
worker's exception is re-raised here with its traceback; a run past ``timeout`` seconds
(a hang in a collective) kills every worker still alive and fails. ``fn`` must be importable
by name (a module-level function) and return picklable values (no tensors: workers compare
their results themselves and return numbers).
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 45  # a collective waiting longer than this fails inside the worker
FAILURE_GRACE_S = 5  # after a rank fails, how long the others get to report


class WorkerError(AssertionError):
    """A rank raised; the message holds every failing rank's traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, results, args, env) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share the machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        out = fn(rank, world, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(fn, world: int, *args, timeout: float = 60.0, env: dict | None = None) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run on its own rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"), **(env or {})}
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, results, args, env),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = results.get(timeout=min(left, 0.5))
                got[rank] = (ok, payload)
                if not ok:  # the others may now wait for it in a collective: short grace
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                continue
            except queue.Empty:
                pass
            # a worker that died without reporting (a crash): stop waiting for it
            dead = [r for r, p in enumerate(procs)
                    if r not in got and p.exitcode is not None and p.exitcode != 0]
            if dead:
                time.sleep(0.5)  # let the others report what they saw
                while True:
                    try:
                        rank, ok, payload = results.get_nowait()
                        got[rank] = (ok, payload)
                    except queue.Empty:
                        break
                for r in dead:
                    got.setdefault(r, (False, f"exited with code {procs[r].exitcode} "
                                              "without reporting"))
                break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        stragglers = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in stragglers:
            procs[r].kill()
            procs[r].join(timeout=5)
        results.close()
    failures = [f"rank {r}: {payload}" for r, (ok, payload) in sorted(got.items()) if not ok]
    missing = [r for r in range(world) if r not in got]
    if missing:
        failures.append(f"ranks {missing} did not finish within {timeout:.0f} s (killed: "
                        f"{stragglers})")
    if failures:
        raise WorkerError("\n".join(failures))
    return [got[r][1] for r in range(world)]
