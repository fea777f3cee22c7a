"""Trainer → SGLang weight transfer, in buckets of HF-named tensors.

Three ways, as SGLang offers them (``worker.rollout.sglang.weight_sync``):

* :class:`DiskWeightSync` (CPU, or trainer and servers on different machines sharing a folder): the
  tensors are written as safetensors shards of at most ``bucket_mb`` each plus an index, into a temp
  folder that is fsynced and renamed to ``v<version>`` (a server never sees half a version), then every
  server loads it with ``POST /update_weights_from_disk``. Older versions are deleted afterwards.
* :class:`TensorWeightSync` (servers on the trainer's GPUs): per bucket, ``POST
  /update_weights_from_tensor`` with the list of ``(name, tensor)`` pickled by ``ForkingPickler`` (CUDA
  tensors travel as IPC handles, not bytes) and base64-encoded, once per TP rank of the server.
* :class:`DistributedWeightSync` (servers on other GPUs): once, ``POST /init_weights_update_group`` on
  every server while the trainer joins the same process group as rank 0; then per bucket, ``POST
  /update_weights_from_distributed`` with names/dtypes/shapes while the trainer broadcasts the tensors.

Each ``push`` stamps the servers with ``weight_version``; pausing generation and flushing the cache
around it is the engine's job (:meth:`~megatron_guided.rollout.sglang.engine.SGLangEngine.update_weights`).
Tensor and distributed sync need CUDA and are covered by exact-protocol tests only on CPU machines.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from megatron_guided.config import SGLangConfig
from megatron_guided.rollout.sglang.client import SGLangClient, SGLangRequestError
from megatron_guided.utils.net import free_port

__all__ = [
    "DiskWeightSync",
    "DistributedWeightSync",
    "TensorWeightSync",
    "WeightSync",
    "iter_buckets",
    "serialize_named_tensors",
    "weight_sync_from_config",
]

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightSync(Protocol):
    async def push(self, client: SGLangClient, named_tensors: NamedTensors, *, version: str) -> None:
        """Load ``named_tensors`` into every server of ``client`` and set their ``weight_version``."""
        ...


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``bucket_bytes`` (a larger tensor forms a bucket alone). A tensor that
    aliases one already yielded (tied embeddings: same storage, shape and strides) is skipped."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        # The storage's identity, not its data pointer: pickling a CPU tensor for IPC moves its storage
        # into shared memory in place (new pointer, same storage).
        key = (tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue
        seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


def _last_flagged(buckets: Iterator[list]) -> Iterator[tuple[list, bool]]:
    """(bucket, is_last) pairs, looking one bucket ahead."""
    current = next(buckets, None)
    while current is not None:
        following = next(buckets, None)
        yield current, following is None
        current = following


def _check_success(answers: list[Any], what: str) -> None:
    failed = [a for a in answers if not (isinstance(a, dict) and a.get("success"))]
    if failed:
        raise SGLangRequestError(f"{what} failed on {len(failed)} of {len(answers)} server(s): {failed[0]!r}")


# ----------------------------------------------------------------------------------------------------------
class DiskWeightSync:
    """Safetensors shards in ``root/v<version>`` (written atomically), loaded by every server.

    Args:
        root: a folder both trainer and servers can read (created if missing).
        bucket_bytes: most bytes per shard.
    """

    def __init__(self, root: str | Path, *, bucket_bytes: int) -> None:
        self.root = Path(root)
        self.bucket_bytes = bucket_bytes

    def write(self, named_tensors: NamedTensors, version: str) -> Path:
        """Write one version; returns its folder (``root/v<version>``), complete and fsynced."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"v{version}"
        tmp = self.root / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            shards = [[(name, t.to("cpu").contiguous()) for name, t in bucket]
                      for bucket in iter_buckets(named_tensors, self.bucket_bytes)]
            weight_map = {}
            for i, shard in enumerate(shards):
                filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(dict(shard), str(tmp / filename), metadata={"format": "pt"})
                weight_map.update({name: filename for name, _ in shard})
            total = sum(t.numel() * t.element_size() for shard in shards for _, t in shard)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
            for path in tmp.iterdir():
                _fsync(path)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    async def push(self, client: SGLangClient, named_tensors: NamedTensors, *, version: str) -> None:
        path = await asyncio.to_thread(self.write, named_tensors, version)
        answers = await client.call_all("/update_weights_from_disk", {
            "model_path": str(path.resolve()), "weight_version": version, "flush_cache": True})
        _check_success(answers, "update_weights_from_disk")
        for old in self.root.glob("v*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's wire form of ``serialized_named_tensors`` entries: ``ForkingPickler`` (torch's reductions:
    CUDA tensors become IPC handles) of the ``(name, tensor)`` list, base64-encoded."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorWeightSync:
    """``/update_weights_from_tensor`` per bucket (colocated GPUs; the tensors stay on the device).

    Args:
        bucket_bytes: most bytes per request.
        tp_size: TP ranks per server (each reads its own copy of the payload list).
    """

    def __init__(self, *, bucket_bytes: int, tp_size: int = 1) -> None:
        self.bucket_bytes = bucket_bytes
        self.tp_size = tp_size

    async def push(self, client: SGLangClient, named_tensors: NamedTensors, *, version: str) -> None:
        for bucket, last in _last_flagged(iter_buckets(named_tensors, self.bucket_bytes)):
            payload = serialize_named_tensors(bucket)
            answers = await client.call_all("/update_weights_from_tensor", {
                "serialized_named_tensors": [payload] * self.tp_size, "load_format": None,
                "flush_cache": last, "weight_version": version if last else None})
            _check_success(answers, "update_weights_from_tensor")


# ----------------------------------------------------------------------------------------------------------
def init_update_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                      timeout_s: float = 600.0) -> Any:
    """A process group outside the default one, built the way SGLang's servers build theirs for
    ``/init_weights_update_group`` (TCP rendezvous, a store prefixed by the group name), so the trainer
    (rank 0) and the server ranks meet in one group."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class DistributedWeightSync:
    """``/update_weights_from_distributed`` with a broadcast from the trainer (rank 0) per tensor.

    Args:
        bucket_bytes: most bytes per request.
        tp_sizes: TP size of each server, in client replica order (server i's ranks start at
            ``1 + sum(tp_sizes[:i])``).
        master_address, master_port: the rendezvous the trainer hosts.
        backend: ``nccl`` on GPUs (``gloo`` only for tests).
        group_name: the update group's name on both sides.
    """

    def __init__(self, *, bucket_bytes: int, tp_sizes: list[int], master_address: str, master_port: int,
                 backend: str = "nccl", group_name: str = "megatron_guided_weight_sync") -> None:
        self.bucket_bytes = bucket_bytes
        self.tp_sizes = tp_sizes
        self.master_address, self.master_port = master_address, master_port
        self.backend, self.group_name = backend, group_name
        self.group: Any = None

    @property
    def world_size(self) -> int:
        return 1 + sum(self.tp_sizes)

    async def connect(self, client: SGLangClient) -> None:
        """Create the update group: every server joins through HTTP while the trainer joins here."""
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.tp_sizes))]
        calls = asyncio.gather(*(client.call(replica, "/init_weights_update_group", {
            "master_address": self.master_address, "master_port": self.master_port, "rank_offset": offset,
            "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend},
            idempotent=False) for replica, offset in zip(client.replicas, offsets, strict=True)))
        self.group = await asyncio.to_thread(
            init_update_group, backend=self.backend, init_method=f"tcp://{self.master_address}:{self.master_port}",
            world_size=self.world_size, rank=0, group_name=self.group_name)
        _check_success(await calls, "init_weights_update_group")

    async def push(self, client: SGLangClient, named_tensors: NamedTensors, *, version: str) -> None:
        if self.group is None:
            await self.connect(client)
        for bucket, last in _last_flagged(iter_buckets(named_tensors, self.bucket_bytes)):
            calls = client.call_all("/update_weights_from_distributed", {
                "names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "flush_cache": last, "weight_version": version if last else None}, idempotent=False)
            broadcast = asyncio.to_thread(self._broadcast, bucket)
            answers, _ = await asyncio.gather(calls, broadcast)
            _check_success(answers, "update_weights_from_distributed")

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        for _, tensor in bucket:
            torch.distributed.broadcast(tensor.contiguous(), src=0, group=self.group)


def weight_sync_from_config(cfg: SGLangConfig, *, default_dir: Path | None) -> WeightSync:
    """The weight sync ``cfg.weight_sync`` names (disk sync writes under ``cfg.weight_sync_dir``, else
    ``default_dir``)."""
    bucket_bytes = cfg.bucket_mb * 2**20
    if cfg.weight_sync == "disk":
        root = cfg.weight_sync_dir or default_dir
        if not root:
            raise ValueError("worker.rollout.sglang.weight_sync_dir is required for weight_sync=disk")
        return DiskWeightSync(root, bucket_bytes=bucket_bytes)
    if cfg.weight_sync == "tensor":
        return TensorWeightSync(bucket_bytes=bucket_bytes, tp_size=cfg.tp_size)
    num_servers = len(cfg.urls) or cfg.num_replicas
    return DistributedWeightSync(bucket_bytes=bucket_bytes, tp_sizes=[cfg.tp_size] * num_servers,
                                 master_address=cfg.master_address,
                                 master_port=cfg.master_port or free_port(cfg.master_address))
