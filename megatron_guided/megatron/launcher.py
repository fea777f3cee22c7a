"""A group of Megatron ranks as local processes, driven by calls from the trainer process.

Each rank is a spawned process that initialises `torch.distributed` (NCCL with GPUs, gloo on CPU,
rendezvous on 127.0.0.1), applies the CPU compatibility layer when there is no GPU, builds a
`MegatronWorker` and then serves method calls from a pipe. A call goes to every rank (SPMD); the
driver gets one result per rank. A method that returns a generator streams its items (weight
buckets) back as they are produced.

Failures are reported, never hung on: a rank that raises sends its traceback, a rank that dies is
noticed by its exit code, and in both cases every rank is stopped and the driver raises
`WorkerGroupError` naming the rank. The group is stopped at interpreter exit too, so no rank
outlives the trainer.

`megatron_guided.launch.ray_workers.RayWorkerGroup` implements the same `WorkerGroup` interface with Ray actors.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import traceback
import types
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

_ITEM, _DONE, _ERROR = "item", "done", "error"


class WorkerGroupError(RuntimeError):
    pass


class WorkerGroup(Protocol):
    """What MegatronBackend drives: `LocalWorkerGroup` here, `launch.ray_workers.RayWorkerGroup` on Ray."""

    world_size: int

    def call(self, method: str, *args, **kwargs) -> list[Any]: ...

    def call_stream(self, method: str, *args, **kwargs) -> Iterator[Any]: ...

    def close(self) -> None: ...


def _die_with_parent() -> None:
    """Linux: the kernel kills this rank when the trainer process dies, however it dies. (Ranks are
    not daemonic processes: dist_checkpointing starts helper processes, which daemons may not.)"""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _quiet_known_warnings() -> None:
    """megatron-core warns at import about every optional GPU package it falls back from (TE, Apex) and
    torch about its own deprecated collectives megatron calls; on CPU those say nothing new."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")


def init_rank(*, rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int,
              threads: int, init_method: str = "env://") -> None:
    """Make this process rank `rank` of the Megatron world: `torch.distributed` on NCCL with a GPU (the
    `local_rank`-th visible one), on gloo without (after the CPU compatibility layer). Shared by the
    local processes here (which meet through a file: no port to race for) and the Ray actors of
    `megatron_guided.launch` (which meet at master_addr:master_port)."""
    _quiet_known_warnings()
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    import torch

    torch.set_num_threads(threads)
    from megatron_guided.megatron import compat

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        compat.install()
        backend = "gloo"
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def _serve(rank: int, world_size: int, rendezvous: str, threads: int, spec, worker_class, conn) -> None:
    """Body of one rank's process: `worker_class(spec)` (default `MegatronWorker`) serves the calls."""
    _die_with_parent()
    try:
        init_rank(rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=0, local_rank=rank,
                  threads=threads, init_method=f"file://{rendezvous}")
        if worker_class is None:
            from megatron_guided.megatron.worker import MegatronWorker as worker_class

        worker = worker_class(spec)
        conn.send((_DONE, None))
    except BaseException:  # noqa: BLE001 - reported to the driver
        conn.send((_ERROR, traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            break
        method, args, kwargs = message
        try:
            result = getattr(worker, method)(*args, **kwargs)
            if isinstance(result, types.GeneratorType):
                for item in result:
                    conn.send((_ITEM, item))
                result = None
            conn.send((_DONE, result))
        except BaseException:  # noqa: BLE001
            conn.send((_ERROR, traceback.format_exc()))
    import torch

    torch.distributed.destroy_process_group()


class LocalWorkerGroup:
    """`world_size` ranks on this machine, each running a `MegatronWorker(spec)`, or `worker_class(spec)`
    (a picklable top-level class, e.g. the conversion verifier's)."""

    def __init__(self, spec, *, world_size: int, threads_per_rank: int = 0, start_timeout: float = 600.0,
                 worker_class: type | None = None):
        ctx = mp.get_context("spawn")
        self._rendezvous_dir = tempfile.mkdtemp(prefix="megatron-guided-rendezvous-")
        rendezvous = os.path.join(self._rendezvous_dir, "store")
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        self.timeout = start_timeout
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, rendezvous, threads, spec, worker_class, child),
                               name=f"megatron-rank{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        atexit.register(self.close)
        self._collect(timeout=start_timeout, what="start-up")

    @property
    def world_size(self) -> int:
        return len(self.procs)

    def _receive(self, rank: int, timeout: float | None, what: str):
        conn, proc = self.conns[rank], self.procs[rank]
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not proc.is_alive():
                self.close()
                raise WorkerGroupError(f"Megatron rank {rank} died (exit code {proc.exitcode}) during {what}")
            if timeout is not None and waited >= timeout:
                self.close()
                raise WorkerGroupError(f"Megatron rank {rank} gave no answer within {timeout:.0f} s during {what}")
        try:
            kind, payload = conn.recv()
        except EOFError:
            self.close()
            raise WorkerGroupError(f"Megatron rank {rank} closed its pipe during {what}") from None
        if kind == _ERROR:
            self.close()
            raise WorkerGroupError(f"Megatron rank {rank} failed during {what}:\n{payload}")
        return kind, payload

    def _collect(self, *, timeout: float | None, what: str, skip: set[int] = frozenset()) -> list[Any]:
        results = []
        for rank in range(self.world_size):
            if rank in skip:
                results.append(None)
                continue
            kind, payload = self._receive(rank, timeout, what)
            while kind == _ITEM:  # a streamed result nobody asked to stream: drop the items
                kind, payload = self._receive(rank, timeout, what)
            results.append(payload)
        return results

    def _send(self, method: str, args: tuple, kwargs: dict) -> None:
        if not self.procs:
            raise WorkerGroupError("the Megatron worker group is closed")
        for conn in self.conns:
            conn.send((method, args, kwargs))

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """Run `worker.method(*args, **kwargs)` on every rank; their results, by rank."""
        self._send(method, args, kwargs)
        return self._collect(timeout=None, what=method)

    def call_stream(self, method: str, *args, **kwargs) -> Iterator[Any]:
        """Run a generator method on every rank; yield rank 0's items as they arrive."""
        self._send(method, args, kwargs)
        while True:
            kind, payload = self._receive(0, None, method)
            if kind != _ITEM:
                break
            yield payload
        self._collect(timeout=None, what=method, skip={0})

    def close(self) -> None:
        """Stop every rank (politely, then by force); safe to call twice."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
