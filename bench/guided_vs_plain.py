"""Guided-GRPO vs plain GRPO on the tiny task: unguided accuracy at equal steps and at equal wall time.

Run from the repo root (default: 4 settings x 3 seeds x 60 steps, 2 runs at a time, 1 thread each)::

    /work/venv/bin/python bench/guided_vs_plain.py --seeds 1 2 3
    /work/venv/bin/python bench/guided_vs_plain.py --report-only outputs/bench_guided/<timestamp>
    /work/venv/bin/python bench/guided_vs_plain.py --dry-run           # print the commands only

Every (setting, seed) is its own ``python -m megatron_guided.train`` subprocess, all from the same
SFT checkpoint (``--model``); seed k sets worker.rollout.seed, data.seed and trainer.seed to k, so a
setting and plain see the same prompts in the same order. Outputs, logs (train.log) and the final
checkpoint of each run go to ``--out/runs/<setting>__s<seed>`` and ``--out/checkpoints/...`` (nothing
resumes from elsewhere); a run already complete in ``--out`` with the same command is not run again.
The report reads each run's ``metrics.jsonl``: ``val/accuracy`` (greedy, the policy alone),
``val_sampled/accuracy`` (T=1), wall time = cumulative ``timing/step`` (validation excluded), and
the guided rollout metrics. Full default run: ~45 min on 2 idle cores (estimated from smoke steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAIN_YAML, GUIDED_YAML = "examples/tiny_cpu.yaml", "examples/tiny_cpu_guided.yaml"
DATA = ("data/arith_easy/train.jsonl", "data/arith_easy/test.jsonl")  # what both YAMLs read


def _guided(fraction: float, when: str, max_corrections: int = 1, penalty: float = 0.5) -> dict:
    v = "worker.rollout.verifier."
    return {"config": GUIDED_YAML, "overrides": {v + "guided_fraction": fraction, v + "guide_when": when,
                                                 v + "max_corrections": max_corrections,
                                                 v + "correction_penalty": penalty}}


SETTINGS: dict[str, dict] = {  # name -> YAML + overrides; "plain" is the baseline of the verdicts
    "plain": {"config": PLAIN_YAML, "overrides": {}},
    "guided_all": _guided(1.0, "always"),  # the original's "guide everything"
    "guided_half": _guided(0.5, "always"),
    "group_failed": _guided(0.5, "group_failed"),
}
VAL_KEYS = ("val/accuracy", "val_sampled/accuracy")


# -- running ---------------------------------------------------------------------------------------
def run_name(setting: str, seed: int) -> str:
    return f"{setting}__s{seed}"


def run_command(setting: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    name = run_name(setting, seed)
    overrides = SETTINGS[setting]["overrides"] | {
        "worker.actor.model.model_path": args.model, "trainer.max_steps": args.steps,
        "trainer.val_freq": args.val_freq, "data.val_max_samples": args.val_samples,
        "trainer.val_before_train": "true", "trainer.val_sampled_n": 1,
        "worker.rollout.seed": seed, "data.seed": seed, "trainer.seed": seed, "trainer.num_threads": 1,
        "trainer.experiment_name": name, "trainer.output_dir": out / "runs" / name,
        "trainer.save_freq": -1, "trainer.save_checkpoint_path": out / "checkpoints" / name,
        "trainer.find_last_checkpoint": "false", "trainer.logger": "[console,file]"}
    return [sys.executable, "-m", "megatron_guided.train", f"config={SETTINGS[setting]['config']}",
            *(f"{k}={v}" for k, v in overrides.items())]


def missing_inputs(model: Path) -> list[str]:
    paths = [model / "config.json", model / "model.safetensors", *(REPO / p for p in DATA)]
    return [str(p) for p in paths if not p.is_file()]


def is_complete(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r["step"] == steps and "val/accuracy" in r for r in read_metrics(path))


def launch(cmd: list[str], run_dir: Path, ckpt_dir: Path) -> tuple[int, float]:
    for stale in (run_dir, ckpt_dir):  # metrics.jsonl is appended to: start a partial run afresh
        shutil.rmtree(stale, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def run_all(args: argparse.Namespace, out: Path) -> int:
    jobs = [(s, k) for k in args.seeds for s in args.settings]  # interleaved: paired runs share the load
    (out / "runs").mkdir(parents=True, exist_ok=True)
    commands = {run_name(s, k): run_command(s, k, args, out) for s, k in jobs}
    manifest = out / "bench.json"
    before = json.loads(manifest.read_text())["commands"] if manifest.is_file() else {}
    todo = [n for n in commands if before.get(n) != commands[n][1:] or not is_complete(out / "runs" / n, args.steps)]
    manifest.write_text(json.dumps({"args": vars(args), "commands": before | {n: c[1:] for n, c in commands.items()}},
                                   indent=1, default=str))
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already complete) in {out}, {args.parallel} at a time")
    failed = 0
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(launch, commands[n], out / "runs" / n, out / "checkpoints" / n): n for n in todo}
        for done, future in enumerate(as_completed(futures), 1):
            name, (rc, wall) = futures[future], future.result()
            rows = read_metrics(out / "runs" / name / "metrics.jsonl") if rc == 0 else []
            final = next((r["val/accuracy"] for r in reversed(rows) if "val/accuracy" in r), float("nan"))
            log = out / "runs" / name / "train.log"
            status = f"ok, final val/accuracy {final:.3f}" if rc == 0 else f"FAILED rc={rc}, see {log}"
            print(f"[{done}/{len(todo)}] {name}: {status} ({wall:.0f} s)", flush=True)
            failed += rc != 0
    return failed


# -- reading metrics (pure) -----------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl, one per step (a repeated step: later values win), by step."""
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = rows.get(int(row["step"]), {}) | row
    return [rows[s] for s in sorted(rows)]


def train_seconds(rows: list[dict]) -> dict[int, float]:
    """Step -> cumulative timing/step up to and including it (validation excluded); step 0 -> 0."""
    total, out = 0.0, {0: 0.0}
    for row in rows:
        total += row.get("timing/step", 0.0)
        out[row["step"]] = total
    return out


def val_series(rows: list[dict], key: str) -> list[tuple[int, float, float]]:
    """(step, train seconds, value) for every row that validated `key`."""
    seconds = train_seconds(rows)
    return [(r["step"], seconds[r["step"]], r[key]) for r in rows if key in r]


def value_at_time(series: list[tuple[int, float, float]], t: float) -> tuple[int, float] | None:
    """(step, value) of the last validation done within t train seconds (a step function), or None."""
    done = [(step, value) for step, sec, value in series if sec <= t + 1e-9]
    return done[-1] if done else None


def time_grid(t_end: float, every: float | None = None, points: int = 6) -> list[float]:
    """0, every, 2*every, ... below t_end, then t_end; `every` defaults to a round step giving ~`points`."""
    if every is None:
        every = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600) if s >= t_end / points), 1200)
    grid = [i * every for i in range(int(t_end // every) + 1) if i * every < t_end - 1e-9]
    return grid + [t_end]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); (nan, nan) when empty."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 3) -> str:
    """'mean±sd' over seeds; a single value without a spread; '-' for none."""
    mean, sd = mean_spread(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}" if values else "-"
    return f"{mean:.{digits}f}±{sd:.{digits}f}"


T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}  # two-sided, n-1 dof


def judge(diffs: list[float]) -> str:
    """'higher' / 'lower' when the 95% t-interval of the paired differences excludes 0, else no call."""
    if len(diffs) < 2:
        return "single seed, no spread to judge by"
    mean, sd = mean_spread(diffs)
    if mean != 0 and abs(mean) > T95.get(len(diffs), 2.0) * sd / math.sqrt(len(diffs)):
        return "higher" if mean > 0 else "lower"
    return "no clear difference (95% t-interval of the seed differences includes 0)"


# -- report ---------------------------------------------------------------------------------------
def load_runs(out: Path) -> dict[str, dict[int, list[dict]]]:
    """setting -> seed -> metric rows, for every runs/<setting>__s<seed>/metrics.jsonl under `out`."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for path in sorted((out / "runs").glob("*__s*/metrics.jsonl")):
        setting, seed = path.parent.name.rsplit("__s", 1)
        if rows := read_metrics(path):
            runs.setdefault(setting, {})[int(seed)] = rows
    return dict(sorted(runs.items(), key=lambda kv: list(SETTINGS).index(kv[0]) if kv[0] in SETTINGS else 99))


def samples_per_step(run_dir: Path) -> int | None:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    return cfg["data"]["rollout_batch_size"] * cfg["worker"]["rollout"]["n"]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def equal_steps_table(runs: dict, key: str) -> str:
    steps = sorted({s for seeds in runs.values() for rows in seeds.values() for s, _, _ in val_series(rows, key)})
    body = [[str(step)] + [fmt([v for rows in seeds.values() for s, _, v in val_series(rows, key) if s == step])
                           for seeds in runs.values()] for step in steps]
    return table(["step", *runs], body)


def equal_time_table(runs: dict, key: str, grid: list[float]) -> str:
    body = []
    for t in grid:
        row = [f"{t:.1f}s"]
        for seeds in runs.values():
            hits = [h for rows in seeds.values() if (h := value_at_time(val_series(rows, key), t))]
            row.append(fmt([v for _, v in hits]) + (f" @{statistics.fmean(s for s, _ in hits):.0f}" if hits else ""))
        body.append(row)
    return table(["train time", *runs], body)


def stats_table(runs: dict, out: Path) -> str:
    """Per setting: s/step, prefix reuse, verifier calls per sample, turns, guided share, corrections."""
    def avg(seeds, key, per_seed=None):
        vals = [r[key] / (per_seed[seed] if per_seed else 1) for seed, rows in seeds.items() for r in rows if key in r]
        return fmt(vals, 2) if vals else "-"

    body = []
    for setting, seeds in runs.items():
        samples = {seed: samples_per_step(out / "runs" / run_name(setting, seed)) or math.nan for seed in seeds}
        last_guided = [rows[-1]["val_guided/accuracy"] for rows in seeds.values() if "val_guided/accuracy" in rows[-1]]
        body.append([setting, str(len(seeds)), avg(seeds, "timing/step"), avg(seeds, "engine/prefix_reuse"),
                     avg(seeds, "verifier/calls", samples), avg(seeds, "guided/turns_mean"),
                     avg(seeds, "guided/fraction"), avg(seeds, "guided/corrections_mean"),
                     fmt(last_guided) if last_guided else "-"])
    return table(["setting", "seeds", "s/step", "prefix_reuse", "verifier calls/sample", "turns",
                  "guided frac", "corr/guided", "final val_guided acc"], body)


def final_by_seed(seeds: dict, key: str, step: int | None = None, t: float | None = None) -> dict[int, float]:
    """seed -> `key` at validation step `step`, or the last one validated within t train seconds."""
    out = {}
    for seed, rows in seeds.items():
        series = val_series(rows, key)
        hit = value_at_time(series, t) if t is not None else next(((s, v) for s, _, v in series if s == step), None)
        if hit:
            out[seed] = hit[1]
    return out


def verdicts(runs: dict, t_end: float) -> list[str]:
    if "plain" not in runs:
        return ["(no plain runs: no verdicts)"]
    base = runs["plain"]
    lines = []
    for setting, seeds in runs.items():
        if setting == "plain":
            continue
        step = min(rows[-1]["step"] for rows in [*seeds.values(), *base.values()])
        speed = [r["timing/step"] for rows in seeds.values() for r in rows if "timing/step" in r]
        base_speed = [r["timing/step"] for rows in base.values() for r in rows if "timing/step" in r]
        ratio = statistics.fmean(speed) / statistics.fmean(base_speed) if speed and base_speed else math.nan
        lines.append(f"{setting} vs plain (s/step {ratio:.2f}x plain's):")
        for label, kw in ((f"at step {step}", {"step": step}), (f"at equal time {t_end:.1f}s", {"t": t_end})):
            mine, ref = final_by_seed(seeds, "val/accuracy", **kw), final_by_seed(base, "val/accuracy", **kw)
            diffs = [mine[k] - ref[k] for k in sorted(mine.keys() & ref.keys())]
            mean, sd = mean_spread(diffs)
            per_seed = " ".join(f"s{k}:{mine[k] - ref[k]:+.3f}" for k in sorted(mine.keys() & ref.keys()))
            lines.append(f"  {label:<22} val/accuracy {mean:+.3f}±{sd:.3f} ({per_seed}) -> {judge(diffs)}")
    return lines


def report(out: Path, time_every: float | None = None) -> None:
    runs = load_runs(out)
    if not runs:
        sys.exit(f"no runs/*/metrics.jsonl under {out}")
    print(f"\n== {out}: mean±sd over seeds ({', '.join(f'{s}: {len(v)}' for s, v in runs.items())} seeds)")
    for key in VAL_KEYS:
        print(f"\n-- {key} (validation on data.val_files, the policy alone) at equal steps\n"
              + equal_steps_table(runs, key))
    longest = max(rows[-1]["step"] for seeds in runs.values() for rows in seeds.values())
    short = [run_name(s, k) for s, seeds in runs.items() for k, rows in seeds.items() if rows[-1]["step"] < longest]
    if short:
        print(f"\nWARNING: runs that stopped before step {longest}: {', '.join(short)}")
    t_end = min(train_seconds(rows)[rows[-1]["step"]] for seeds in runs.values() for rows in seeds.values())
    grid = time_grid(t_end, time_every)
    for key in VAL_KEYS:
        print(f"\n-- {key} at equal train time (cumulative timing/step, validation excluded; last validation "
              f"done by then, @ = mean step of it; up to the shortest run)\n" + equal_time_table(runs, key, grid))
    print("\n-- training rollouts (mean±sd over all steps of all seeds)\n" + stats_table(runs, out))
    print("\n-- verdicts (paired by seed, difference guided - plain, mean±sd)")
    print("\n".join(verdicts(runs, t_end)))


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=60, help="trainer.max_steps")
    p.add_argument("--val-freq", type=int, default=20, help="trainer.val_freq")
    p.add_argument("--val-samples", type=int, default=300, help="data.val_max_samples")
    p.add_argument("--model", default="outputs/sft/tiny-qwen2-sft", help="SFT checkpoint all runs start from")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses 1 thread)")
    p.add_argument("--out", default=None, help="default outputs/bench_guided/<timestamp>")
    p.add_argument("--time-every", type=float, default=None, help="equal-time grid step in s (default: ~6 points)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--report-only", metavar="DIR", help="only print the report of an existing --out folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        report(Path(args.report_only), args.time_every)
        return 0
    model = Path(args.model) if Path(args.model).is_absolute() else REPO / args.model
    args.model = str(model)
    out = Path(args.out or REPO / "outputs" / "bench_guided" / time.strftime("%Y%m%d-%H%M%S")).absolute()
    if args.dry_run:
        for k in args.seeds:
            for s in args.settings:
                print(" ".join(run_command(s, k, args, out)))
        return 0
    if missing := missing_inputs(model):
        print("missing: " + ", ".join(missing) + "\nmake them from the repo root with\n"
              "  bash examples/run_tiny_cpu.sh      # model + data + SFT, then a 100-step plain GRPO run\n"
              "or step by step:\n"
              "  python3 tools/make_tiny_model.py --out models/tiny-qwen2\n"
              "  python3 tools/prepare_data.py --task arith --difficulty easy --out data/arith_easy "
              "--train 20000 --dev 200 --test 500 --seed 0\n"
              "  python3 -m megatron_guided.sft config=examples/sft_tiny_cpu.yaml   # -> outputs/sft/tiny-qwen2-sft",
              file=sys.stderr)
        return 2
    failed = run_all(args, out)
    report(out, args.time_every)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
