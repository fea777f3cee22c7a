"""Megatron ranks as Ray actors: `RayWorkerGroup` has `LocalWorkerGroup`'s interface (`call`,
`call_stream`, `close`, `world_size`), so `MegatronBackend` drives either unchanged.

Each actor runs in its placement slot, becomes rank r of the world through the same bootstrap as the
local processes (`launcher.init_rank`: NCCL on GPUs, gloo and the CPU compatibility layer without),
rendezvousing at rank 0's node address, and builds a `MegatronWorker`. A call goes to every rank; the
driver waits on all of them at once, so the first rank that raises or dies ends the call with
`WorkerGroupError` (its traceback included) and the whole cluster is closed: ranks blocked in a
collective with the failed one are killed, never waited for.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import ray

from megatron_guided.launch.ray_cluster import RayCluster
from megatron_guided.megatron.launcher import WorkerGroupError, init_rank
from megatron_guided.utils.net import free_port


class RankActor:
    """One Megatron rank (the body of a Ray actor)."""

    def __init__(self):
        self.worker = None

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def start(self, spec, *, rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int,
              threads: int) -> None:
        init_rank(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                  local_rank=local_rank, threads=threads)
        from megatron_guided.megatron.worker import MegatronWorker

        self.worker = MegatronWorker(spec)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """`worker.method(...)`; a generator is run to its end (its items are rank 0's to stream)."""
        result = getattr(self.worker, method)(*args, **kwargs)
        if isinstance(result, types.GeneratorType):
            for _ in result:
                pass
            return None
        return result

    def stream(self, method: str, args: tuple, kwargs: dict) -> Iterator[Any]:
        yield from getattr(self.worker, method)(*args, **kwargs)


class RayWorkerGroup:
    """The trainer's ranks in `cluster`'s rank slots. The group owns the Ray session: `close()` (called by
    `MegatronBackend.close` when the trainer ends) tears the whole cluster down, engines included."""

    def __init__(self, cluster: RayCluster, spec, *, threads_per_rank: int, start_timeout: float):
        self.cluster = cluster
        slots = cluster.plan.ranks
        self.actors = [cluster.spawn(RankActor, slot, name=f"megatron-rank{r}") for r, slot in enumerate(slots)]
        (addr, port), = self._wait([self.actors[0].rendezvous_address.remote()], "start-up", start_timeout)
        starts = [actor.start.remote(spec, rank=r, world_size=len(slots), master_addr=addr, master_port=port,
                                     local_rank=slots[r].bundle, threads=threads_per_rank)
                  for r, actor in enumerate(self.actors)]
        self._wait(starts, "start-up", start_timeout)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _fail(self, rank: int, what: str, exc: BaseException) -> WorkerGroupError:
        self.close()
        if isinstance(exc, ray.exceptions.RayTaskError):
            return WorkerGroupError(f"Megatron rank {rank} failed during {what}:\n{exc}")
        return WorkerGroupError(f"Megatron rank {rank} died during {what}: {exc}")

    def _wait(self, refs: list, what: str, timeout: float | None = None) -> list[Any]:
        """Every ref's value, by position; the first failure (in completion order) is raised at once."""
        if not self.actors:
            raise WorkerGroupError("the Megatron worker group is closed")
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                self.close()
                raise WorkerGroupError(f"Megatron ranks gave no answer within {timeout:.0f} s during {what}")
            try:
                ray.get(done[0])
            except (ray.exceptions.RayError, WorkerGroupError) as exc:
                raise self._fail(index[done[0]], what, exc) from None
        return ray.get(refs)

    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """Run `worker.method(*args, **kwargs)` on every rank; their results, by rank."""
        if not self.actors:
            raise WorkerGroupError("the Megatron worker group is closed")
        return self._wait([a.call.remote(method, args, kwargs) for a in self.actors], method)

    def call_stream(self, method: str, *args, **kwargs) -> Iterator[Any]:
        """Run a generator method on every rank; yield rank 0's items as they arrive, while watching the
        other ranks (a rank that fails mid-stream would leave rank 0 blocked in a collective)."""
        if not self.actors:
            raise WorkerGroupError("the Megatron worker group is closed")
        items = self.actors[0].stream.options(num_returns="streaming").remote(method, args, kwargs)
        others = [a.call.remote(method, args, kwargs) for a in self.actors[1:]]
        rank_of = {ref: rank for rank, ref in enumerate(others, start=1)}
        while True:
            ready, _ = ray.wait([items, *others], num_returns=1, timeout=None, fetch_local=False)
            if ready[0] is not items:
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise self._fail(rank_of[ready[0]], method, exc) from None
                others.remove(ready[0])
                continue
            try:
                ref = next(items)
            except StopIteration:
                break
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise self._fail(0, method, exc) from None
        self._wait(others, method)

    def close(self) -> None:
        """Stop the ranks and everything else in the cluster; safe to call twice."""
        self.actors = []
        self.cluster.close()
