"""Conversion throughput and memory on a generated multi-GB checkpoint (random weights).

Generates an HF checkpoint with a real model's shapes (default: Qwen2.5-3B, bf16, 6.2 GB; or
Qwen2.5-1.5B, 3.1 GB; sharded safetensors of `--shard-size`) in a temp folder, then times on this disk, each in its own process:

1. a plain copy of the same files (`shutil.copyfile` + fsync): the baseline;
2. `hf-to-mcore` (→ dist_ckpt), 3. `mcore-to-hf` (→ HF shards of the same size);

and prints throughput relative to the copy (bytes / s ÷ the copy's; target ≥ 0.5) and peak RSS of
the converting process relative to the largest HF shard (target ≤ 2). Also checks that the round
trip is bit-identical, tensor by tensor. The temp folder is deleted at the end.

    /work/venv/bin/python bench/convert_throughput.py [--model qwen2.5-3b|qwen2.5-1.5b] [--shard-size 1GB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # the published configs' architecture fields
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
}


def generate(out: Path, shape: dict, shard_bytes: int) -> int:
    """A random bf16 HF checkpoint, written tensor by tensor (names and shapes from a meta-device model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_guided.convert.hf_io import StreamingSafetensorsWriter, TensorSpec, plan_shards

    config = AutoConfig.for_model(**shape, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [TensorSpec(n, tuple(p.shape), torch.bfloat16) for n, p in model.state_dict().items()
             if not (config.tie_word_embeddings and n == "lm_head.weight")]
    out.mkdir(parents=True)
    writer = StreamingSafetensorsWriter(out, plan_shards(specs, shard_bytes))
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(out)
    return sum(s.nbytes for s in specs)


def measured(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of `command`, run in a fresh wrapper process so that the
    children's maximum RSS is that command's alone."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "code = subprocess.call(sys.argv[1:]); t = time.perf_counter() - t; "
               "print(json.dumps([code, t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    code, seconds, rss = json.loads(result.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"{command} failed:\n{result.stderr[-3000:]}")
    return seconds, rss


COPY = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, dst / f.name)
    with open(dst / f.name, "rb") as h:
        os.fsync(h.fileno())
"""


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from megatron_guided.megatron.model import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if set(ra.keys()) != set(rb.keys()):
        return False
    return all(torch.equal(ra.read([k])[k], rb.read([k])[k]) for k in ra.keys())


def main(argv: list[str] | None = None) -> dict:
    from megatron_guided.convert.cli import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2.5-3b")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"))
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        total = generate(work / "hf", SHAPES[args.model], args.shard_size)
        largest = max(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
        print(f"generated {args.model}: {total / 1e9:.2f} GB of bf16 tensors, largest shard {largest / 1e9:.2f} GB")
        cli = [sys.executable, "-m", "megatron_guided.convert"]
        copy_s, copy_rss = measured([sys.executable, "-c", COPY, str(work / "hf"), str(work / "copy")])
        shutil.rmtree(work / "copy")
        idle_s, idle_rss = measured([sys.executable, "-c", "import megatron_guided.convert.to_hf, megatron.core"])
        to_mcore_s, to_mcore_rss = measured([*cli, "hf-to-mcore", "--hf", str(work / "hf"), "--out",
                                             str(work / "mcore"), "--no-progress"])
        to_hf_s, to_hf_rss = measured([*cli, "mcore-to-hf", "--megatron", str(work / "mcore"), "--out",
                                       str(work / "back"), "--max-shard-size", str(args.shard_size), "--no-progress"])
        identical = same_tensors(work / "hf", work / "back")
        result = {
            "model": args.model, "bytes": total, "largest_shard_bytes": largest,
            "copy_s": copy_s, "hf_to_mcore_s": to_mcore_s, "mcore_to_hf_s": to_hf_s,
            "import_s": idle_s, "import_rss": idle_rss,
            "hf_to_mcore_throughput_vs_copy": copy_s / to_mcore_s, "mcore_to_hf_throughput_vs_copy": copy_s / to_hf_s,
            "hf_to_mcore_rss": to_mcore_rss, "mcore_to_hf_rss": to_hf_rss,
            "hf_to_mcore_rss_vs_shard": to_mcore_rss / largest, "mcore_to_hf_rss_vs_shard": to_hf_rss / largest,
            "round_trip_identical": identical,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    print(f"{'':14s} {'seconds':>8s} {'GB/s':>6s} {'vs copy':>8s} {'peak RSS GB':>12s} {'RSS / shard':>12s}")
    print(f"{'plain copy':14s} {copy_s:8.1f} {total / copy_s / gb:6.2f} {1.0:8.2f} {copy_rss / gb:12.2f}")
    for name, key in (("hf-to-mcore", "hf_to_mcore"), ("mcore-to-hf", "mcore_to_hf")):
        seconds, rss = result[f"{key}_s"], result[f"{key}_rss"]
        print(f"{name:14s} {seconds:8.1f} {total / seconds / gb:6.2f} {result[f'{key}_throughput_vs_copy']:8.2f} "
              f"{rss / gb:12.2f} {result[f'{key}_rss_vs_shard']:12.2f}")
    print(f"(python + megatron-core imports alone: {idle_rss / gb:.2f} GB RSS, {idle_s:.1f} s, included above; "
          f"without them: hf-to-mcore {copy_s / (to_mcore_s - idle_s):.2f}x, mcore-to-hf {copy_s / (to_hf_s - idle_s):.2f}x "
          f"the copy; round trip bit-identical: {identical})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
