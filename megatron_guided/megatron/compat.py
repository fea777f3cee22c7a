"""Megatron-Core on a machine without a GPU: the one place that bends CUDA assumptions to the CPU.

megatron-core (0.16.1 and newer) is written for CUDA. Run on CPU with the gloo backend it works
exactly (see the tests: logits equal HF's, TP/PP updates equal a single-process one) once these
assumptions are met. Each item was found by a run that fails without it:

1. ``torch.cuda.current_device()`` is used as the device of buffers (attention workspace, TP
   mappings, rotary tables, p2p shapes) → it returns the CPU device here.
2. Tensors are created with ``device="cuda"``, moved with ``.cuda()``/``pin_memory()``, and types are
   asserted with ``param.grad.type() == "torch.cuda.FloatTensor"`` (optimizer, grad clipping,
   schedules) → :class:`CudaToCpu`, a ``TorchFunctionMode`` that rewrites CUDA devices to CPU, makes
   ``.cuda()``/``.pin_memory()`` return the tensor and reports CUDA type names from ``Tensor.type()``.
   It costs ~18% of a tiny step; a GPU run never enters it.
3. ``torch.cuda.synchronize()`` is called between pipeline p2p ops → a no-op.
4. The model-parallel RNG tracker snapshots CUDA generator states (``model_parallel_cuda_manual_seed``
   calls ``torch.cuda.manual_seed``) → :class:`CpuRngStatesTracker` forks the CPU generator instead,
   seeded with Megatron's own rule (data-parallel: seed; tensor-parallel: seed + 2718 + tp_rank;
   expert: seed + 1024 + 100·ep_rank + etp_rank) by :func:`seed_model_parallel_rng`.
5. Without an attention mask, the local attention builds a causal mask on "cuda" → callers always
   pass an explicit bool mask (``True`` = masked); see :func:`megatron_guided.megatron.model.causal_mask`.
6. Batched p2p (``batch_isend_irecv``) on gloo mixes up messages when two stages are each other's
   previous and next stage (PP=2 with the interleaved schedule: activations and gradients of the
   same shape cross in both directions) → ``batch_p2p_comm=False`` (megatron's ordered even/odd
   send/recv) on CPU; the grad norm was 24× off without it. And the interleaved schedule deadlocks
   exchanging shapes with ``variable_seq_lengths`` → with VPP the worker pads its micro-batches
   to one shape instead (items 5-6 are set in :func:`megatron_guided.megatron.model.transformer_config`).

Not bent here, refused by config validation instead: ``sequence_parallel`` (needs TE/Apex norms),
context parallelism and THD packing (need TE attention), FP8 (needs TE and Hopper).

Apply with :func:`install` once per process, before building models; it does nothing when a GPU
is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed_mode: TorchFunctionMode | None = None


def _to_cpu(device):
    """A CUDA device given as int, str or torch.device → CPU; anything else unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor", "torch.LongTensor": "torch.cuda.LongTensor",
                    "torch.IntTensor": "torch.cuda.IntTensor", "torch.ByteTensor": "torch.cuda.ByteTensor"}


class CudaToCpu(TorchFunctionMode):
    """Every torch call made inside this mode sees CUDA devices as the CPU (item 2 above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class CpuRngStatesTracker:
    """Megatron's RNG-states tracker API (``add``, ``fork``, ``get_states``, ``set_states``, ``reset``)
    over named states of the CPU generator (item 4 above)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already tracked")
        if name in self.states_:
            raise ValueError(f"rng state {name} already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not tracked; call seed_model_parallel_rng first")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_model_parallel_rng(seed: int) -> None:
    """CPU twin of ``tensor_parallel.model_parallel_cuda_manual_seed`` (same seeds per stream)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRngStatesTracker()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * parallel_state.get_expert_model_parallel_rank()
                + parallel_state.get_expert_tensor_parallel_rank())
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install() -> bool:
    """Apply items 1-3 to this process when it has no GPU; returns whether it did."""
    global _installed_mode
    if torch.cuda.is_available() or _installed_mode is not None:
        return False
    torch.cuda.current_device = lambda: _CPU  # item 1
    torch.cuda.synchronize = lambda device=None: None  # item 3
    _installed_mode = CudaToCpu()
    _installed_mode.__enter__()  # item 2, for the rest of this (worker) process
    return True


def on_cpu() -> bool:
    return _installed_mode is not None
