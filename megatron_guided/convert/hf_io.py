"""The HF side of a conversion on disk: tensor headers without data, a safetensors writer that streams
tensors straight into sharded files, and the non-weight files of a model folder.

safetensors layout (the format's own spec): 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` (padded with
spaces to a multiple of 8), then the raw little-endian tensor bytes. Because every header is known
before any tensor is produced (the plan is computed from shapes alone), each file is written front to
back and a tensor is on disk as soon as it is converted: memory holds one tensor, never a shard.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SKIPPED_FILES = ("model.safetensors", INDEX_FILE, "pytorch_model.bin", "pytorch_model.bin.index.json",
                 "conversion.json", "layout.json")
"""Weights of a model folder and Megatron-side records: never copied as "other files"."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def read_header(file: Path) -> dict[str, TensorSpec]:
    """Shapes and dtypes of one safetensors file, from its header only."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    specs = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which the converter does not handle")
        specs[name] = TensorSpec(name, tuple(info["shape"]), DTYPES[info["dtype"]])
    return specs


def read_specs(model_dir: Path, weight_map: dict[str, str]) -> dict[str, TensorSpec]:
    """Every tensor's spec, for an HF folder whose `weight_map` (name → file) is known."""
    specs = {}
    for file in sorted(set(weight_map.values())):
        specs.update(read_header(model_dir / file))
    missing = sorted(set(weight_map) - set(specs))
    if missing:
        raise ValueError(f"{model_dir}: the index names tensors that its files lack: {missing[:5]}")
    return {name: specs[name] for name in weight_map}


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into files of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


class StreamingSafetensorsWriter:
    """Writes the planned tensors, in plan order, into `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json` (always, even for one file)."""

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]]):
        self.out_dir, self.shards = Path(out_dir), shards
        self.files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.order = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self.next_item = 0
        self.handle = None
        self.open_shard = -1

    def _start(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for spec in self.shards[shard]:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.handle = open(self.out_dir / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.open_shard = shard

    def write(self, name: str, tensor: Tensor) -> None:
        """The next tensor of the plan (name, shape and dtype must be the planned ones)."""
        if self.next_item >= len(self.order):
            raise RuntimeError(f"{name}: more tensors than planned")
        shard, spec = self.order[self.next_item]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrives where the plan has "
                               f"{spec.name} {spec.shape} {spec.dtype}")
        if shard != self.open_shard:
            self._start(shard)
        self.handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.next_item += 1

    def close(self) -> None:
        """Finish the last file and write the index; every planned tensor must have been written."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.next_item != len(self.order):
            raise RuntimeError(f"{len(self.order) - self.next_item} planned tensors were never written")
        weight_map = {spec.name: self.files[shard] for shard, spec in self.order}
        total = sum(spec.nbytes for _, spec in self.order)
        (self.out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                           "weight_map": weight_map}, indent=2))


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Everything of an HF folder except its weights (config, generation config, tokenizer, chat
    template, …), top level only. Returns the copied names."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name not in SKIPPED_FILES and not path.name.endswith(".safetensors"):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
