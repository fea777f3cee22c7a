"""Generate train/test JSONL splits of a locally generated toy task.

From the repo root::

    python tools/prepare_data.py --task arith --difficulty easy --out data/arith_easy \
        --train 20000 --test 500 --seed 0
    python tools/prepare_data.py --task visual_arith --out data/visual_arith --train 4000 --dev 200 --test 200

Writes ``<out>/train.jsonl`` and ``<out>/test.jsonl``; one JSON object per line
with keys ``problem``, ``answer``, ``solution``, ``steps``. No ``problem``
appears twice, within or across the two files. ``visual_arith`` rows also hold ``images`` (paths
relative to ``<out>``, written under ``<out>/images/``; see :mod:`megatron_guided.data.toy_visual`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import megatron_guided  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_guided.data.toy_arith import DIFFICULTIES, make_splits  # noqa: E402
from megatron_guided.data.toy_visual import make_visual_splits  # noqa: E402

TASKS = ("arith", "visual_arith")


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="arith")
    p.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="easy")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=20000, help="number of train problems")
    p.add_argument("--test", type=int, default=500, help="number of test problems")
    p.add_argument("--dev", type=int, default=0, help="number of dev problems (model selection, e.g. SFT early stop)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    if args.task == "visual_arith":
        counts = {"test": args.test, "train": args.train} | ({"dev": args.dev} if args.dev else {})
        splits = tuple(make_visual_splits(args.out, counts, seed=args.seed).items())
    else:
        train, test = make_splits(args.train + args.dev, args.test, difficulty=args.difficulty, seed=args.seed)
        train, dev = train[: args.train], train[args.train :]
        splits = (("train", train), ("test", test)) + ((("dev", dev),) if args.dev else ())
    for name, rows in splits:
        path = os.path.join(args.out, f"{name}.jsonl")
        write_jsonl(rows, path)
        print(f"wrote {len(rows):>6} rows to {path}")


if __name__ == "__main__":
    main()
