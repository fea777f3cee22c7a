"""`python -m megatron_guided.convert` (also `tools/convert_checkpoint.py`): the command line.

    hf-to-mcore --hf DIR --out DIR [--tp N --pp N --vpp N --make-vocab-size-divisible-by 128] ...
    mcore-to-hf --megatron DIR --out DIR [--hf-config PATH] [--max-shard-size 5GB] ...

Common: --dtype bf16|fp16|fp32, --megatron-args FILE.json, --overwrite, --no-progress,
--verify [--verify-tp N --verify-pp N] [--tolerance T].

Exit status: 0 done (and verified, with --verify); 1 the logits differ by more than the tolerance
(the output is kept, the numbers are printed); 2 refused (mismatched config, unsupported model,
missing files): nothing is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from megatron_guided.convert.guards import ConversionError, read_megatron_args_file
from megatron_guided.megatron.layout import ParallelLayout
from megatron_guided.megatron.model import UnsupportedModelError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DEFAULT_TOLERANCE = 1e-4
"""fp32 on both sides; tiny models measure ≤ 5e-6 (see tests/megatron/test_convert_roundtrip.py)."""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_guided.convert",
                                     description="HF <-> Megatron-Core (dist_checkpointing) checkpoint conversion")
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron model folder (config + dist_ckpt/)")
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF model folder (safetensors)")
    to_mcore.add_argument("--tp", type=int, default=1, help="target tensor parallelism (vocab padding, checks)")
    to_mcore.add_argument("--pp", type=int, default=1, help="target pipeline parallelism (checks)")
    to_mcore.add_argument("--vpp", type=int, default=None, help="target virtual pipeline stages (checks)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron model folder / training checkpoint -> HF folder")
    to_hf.add_argument("--megatron", required=True, type=Path,
                       help="converted folder, global_step_N training checkpoint, or bare dist checkpoint")
    to_hf.add_argument("--hf-config", type=Path, default=None,
                       help="HF config (folder or config.json); default: the one stored with the checkpoint")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    for command in (to_mcore, to_hf):
        command.add_argument("--out", required=True, type=Path)
        command.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                             help="cast to this dtype (default: keep the source's)")
        command.add_argument("--megatron-args", type=Path, default=None,
                             help="JSON of Megatron-LM arguments the model must agree with")
        command.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
        command.add_argument("--no-progress", action="store_true")
        command.add_argument("--verify", action="store_true", help="compare logits of both sides afterwards")
        command.add_argument("--verify-tp", type=int, default=None)
        command.add_argument("--verify-pp", type=int, default=None)
        command.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    return parser


def run(args: argparse.Namespace) -> int:
    from megatron_guided.convert.to_hf import mcore_to_hf, saved_layout
    from megatron_guided.convert.to_mcore import hf_to_mcore
    from megatron_guided.convert.verify import verify_logits

    megatron_args = read_megatron_args_file(args.megatron_args) if args.megatron_args else None
    dtype = DTYPES[args.dtype] if args.dtype else None
    progress = not args.no_progress
    if args.command == "hf-to-mcore":
        layout = ParallelLayout(tp=args.tp, pp=args.pp, vpp=args.vpp,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        hf_to_mcore(args.hf, args.out, layout=layout, dtype=dtype, megatron_args=megatron_args,
                    overwrite=args.overwrite, progress=progress)
        hf_dir, megatron_dir, saved = args.hf, args.out, {"tp": args.tp, "pp": args.pp}
    else:
        mcore_to_hf(args.megatron, args.out, hf_config=args.hf_config, dtype=dtype,
                    max_shard_bytes=args.max_shard_size, megatron_args=megatron_args, overwrite=args.overwrite,
                    progress=progress)
        hf_dir, megatron_dir, saved = args.out, args.megatron, saved_layout(args.megatron) or {}
    print(f"wrote {args.out}")
    if not args.verify:
        return 0
    layout = ParallelLayout(tp=args.verify_tp or saved.get("tp", 1), pp=args.verify_pp or saved.get("pp", 1))
    result = verify_logits(hf_dir, megatron_dir, layout, tolerance=args.tolerance)
    print(result.report())
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConversionError, UnsupportedModelError, FileNotFoundError) as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
