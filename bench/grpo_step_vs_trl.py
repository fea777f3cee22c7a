"""Tokens/s of one GRPO step: megatron-guided's Trainer vs TRL's GRPOTrainer, same model, same batch.

Run from the repo root with the bench venv (it has our requirements plus bench/requirements.txt)::

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install -r requirements.txt -r bench/requirements.txt
    /work/venv-bench/bin/python bench/grpo_step_vs_trl.py            # --steps 3 --threads 2 ...

What it does: builds the random tiny Qwen2 model (``tools/make_tiny_model.py``) and the easy
arithmetic data (``tools/prepare_data.py``) in a temp folder (or takes ``--model`` / ``--data``),
then runs each side in its own subprocess (own thread pools and caches): one warm-up step, then
``--steps`` timed steps. Both sides see the same prompts in the same order (no shuffling: step k
takes train rows [32k, 32k+32)), the same workload (32 prompts x 8 samples, <= 64 new tokens,
temperature 1, top_p 1, reward ``examples/reward_function/math.py:compute_score``, one optimizer
step per rollout batch in micro-batches of 64 sequences, lr 1e-4, no KL, fp32, the same attention
implementation and the same torch thread count).

tokens/s = sum over the step's 256 samples of (prompt tokens + completion tokens) / the step's wall
time (generation + reward + logprob/loss/backward + optimizer; ours also includes its weight sync
to the rollout engine), timed with ``time.perf_counter()``: around ``Trainer.train_one_step()`` for
ours, from TRL's ``on_step_begin`` to ``on_step_end`` callbacks for TRL. The table shows medians
over the timed steps and the ratio ours / TRL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REWARD_SPEC = f"{REPO / 'examples' / 'reward_function' / 'math.py'}:compute_score"
MICRO_BATCH = 64  # sequences per forward/backward micro-batch, both sides


# ------------------------------------------------------------------------------------------------
# Helpers shared by both workers
# ------------------------------------------------------------------------------------------------
def _prompt_digest(problems: list[str]) -> str:
    """Order-independent digest of a step's prompts (to check both sides trained on the same batch)."""
    return hashlib.sha256("\n".join(sorted(problems)).encode()).hexdigest()[:16]


def _set_threads(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------------
# Worker: megatron-guided
# ------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    _set_threads(args.threads)
    import torch

    from megatron_guided.config import load_config
    from megatron_guided.train.main import build_trainer

    work = Path(args.workdir)
    overrides = [
        f"config={REPO / 'examples' / 'tiny_cpu.yaml'}",
        f"data.train_files={Path(args.data) / 'train.jsonl'}",
        "data.val_files=''",
        "data.shuffle=false",
        f"data.rollout_batch_size={args.prompts}",
        f"data.max_response_length={args.max_new_tokens}",
        f"worker.actor.global_batch_size={args.prompts}",  # one optimizer step per rollout batch
        f"worker.actor.micro_batch_size_per_device_for_update={MICRO_BATCH}",
        f"worker.actor.model.model_path={args.model}",
        f"worker.actor.model.attn_implementation={args.attn}",
        "worker.actor.model.dtype=float32",
        "worker.actor.optim.lr=1.0e-4",
        "worker.actor.optim.lr_warmup_steps=0",
        "worker.actor.optim.lr_scheduler_type=constant",
        f"worker.rollout.n={args.n}",
        "worker.rollout.temperature=1.0",
        "worker.rollout.top_p=1.0",
        f"worker.reward.reward_function={REWARD_SPEC}",
        "algorithm.kl_coef=0.0",
        f"trainer.num_threads={args.threads}",
        f"trainer.max_steps={1 + args.steps}",
        f"trainer.seed={args.seed}",
        f"trainer.output_dir={work / 'ours_out'}",
        f"trainer.save_checkpoint_path={work / 'ours_ckpt'}",
        "trainer.logger=[]",
        *args.ours_set,
    ]
    cfg = load_config(overrides)
    trainer = build_trainer(cfg)

    captured: list = []
    generate = trainer.generate

    def capturing_generate(prompt_indices):
        trajectories = generate(prompt_indices)
        captured[:] = trajectories
        return trajectories

    trainer.generate = capturing_generate

    steps = []
    for i in range(1 + args.steps):
        start = time.perf_counter()
        metrics = trainer.train_one_step()
        wall = time.perf_counter() - start
        problems = sorted({trainer.train_data[t.prompt_index].messages[-1]["content"] for t in captured})
        timings = {k.removeprefix("timing/"): v for k, v in metrics.items() if k.startswith("timing/")}
        steps.append({
            "warmup": i == 0,
            "wall_s": wall,
            "samples": len(captured),
            "prompt_tokens": sum(len(t.prompt_ids) for t in captured),
            "completion_tokens": sum(len(t.response_ids) for t in captured),
            "gen_s": timings.get("gen", 0.0),
            "reward_s": timings.get("reward", 0.0),
            "train_s": sum(timings.get(k, 0.0) for k in ("old", "ref", "adv", "update_actor")),
            "other_s": timings.get("sync", 0.0),
            "timings": timings,
            "prompts": _prompt_digest(problems),
            "num_prompts": len(problems),
            "reward_mean": metrics.get("reward/overall"),
            "threads": torch.get_num_threads(),
        })
    return {"side": "ours", "steps": steps}


# ------------------------------------------------------------------------------------------------
# Worker: TRL
# ------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    _set_threads(args.threads)
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_guided.reward.function import load_reward_function

    compute_score = load_reward_function(REWARD_SPEC)

    def math_reward(prompts, completions, answer, **kwargs):
        """TRL reward_funcs signature around our compute_score (same function, same inputs)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        outs = compute_score([{"response": t, "ground_truth": a} for t, a in zip(texts, answer, strict=True)])
        return [o["overall"] for o in outs]

    rows = [json.loads(line) for line in (Path(args.data) / "train.jsonl").read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "answer": str(r["answer"])}
                                 for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)

    batch = args.prompts * args.n
    if batch % MICRO_BATCH:
        raise SystemExit(f"--prompts x --n = {batch} must be a multiple of {MICRO_BATCH}")
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl_out"),
        # one generation batch (prompts x n completions) = one optimizer step, in micro-batches of 64
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=batch // MICRO_BATCH,  # steps_per_generation defaults to this
        num_generations=args.n,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,  # no KL, so no reference model
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",  # token-mean over the whole optimizer batch, like ours (loss_avg_mode=token)
        scale_rewards="group",
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,  # TRL defaults to bf16=True
        fp16=False,
        activation_checkpointing=False,  # TRL defaults gradient_checkpointing=True; ours runs without it
        use_cpu=True,
        use_vllm=False,  # plain model.generate
        shuffle_dataset=False,  # same prompt order as ours (data.shuffle=false)
        max_steps=1 + args.steps,
        seed=args.seed,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class TimedGRPOTrainer(GRPOTrainer):
        """Counts the step's prompt/completion tokens and times generation and reward."""

        def _generate(self, prompts):
            out = super()._generate(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            probe["prompt_tokens"] += sum(len(p) for p in prompt_ids)
            probe["completion_tokens"] += sum(len(c) for c in completion_ids)
            probe["samples"] += len(completion_ids)
            probe["problems"].update(p[-1]["content"] for p in prompts)
            return out

        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                probe["gen_s"] += time.perf_counter() - start

        def _calculate_rewards(self, *a, **kw):
            start = time.perf_counter()
            try:
                out = super()._calculate_rewards(*a, **kw)
                probe["reward_sum"] += float(out.sum())
                return out
            finally:
                probe["reward_s"] += time.perf_counter() - start

    probe: dict = {}
    steps: list[dict] = []

    def reset_probe():
        probe.update(prompt_tokens=0, completion_tokens=0, samples=0, problems=set(), gen_s=0.0,
                     reward_s=0.0, reward_sum=0.0)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            reset_probe()
            probe["start"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            wall = time.perf_counter() - probe["start"]
            steps.append({
                "warmup": not steps,
                "wall_s": wall,
                "samples": probe["samples"],
                "prompt_tokens": probe["prompt_tokens"],
                "completion_tokens": probe["completion_tokens"],
                "gen_s": probe["gen_s"],
                "reward_s": probe["reward_s"],
                "train_s": wall - probe["gen_s"] - probe["reward_s"],
                "other_s": 0.0,
                "prompts": _prompt_digest(sorted(probe["problems"])),
                "num_prompts": len(probe["problems"]),
                "reward_mean": probe["reward_sum"] / max(1, probe["samples"]),
                "threads": torch.get_num_threads(),
                "activation_checkpointing": bool(getattr(kwargs["model"], "is_activation_checkpointing", False)),
            })

    reset_probe()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
    trainer.train()
    return {"side": "trl", "trl_version": trl.__version__, "steps": steps}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _code_state() -> str:
    """Commit of the checkout and how many tracked files differ from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (f" + {len(dirty)} modified tracked file(s)" if dirty else "")


def _run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, quiet: bool = False) -> None:
    """Run cmd; with quiet=True its output is shown only if it fails."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=quiet, text=True)
    if proc.returncode:
        if quiet:
            sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def _summarise(result: dict) -> dict:
    timed = [s for s in result["steps"] if not s["warmup"]]
    if not timed:
        raise SystemExit(f"{result['side']}: no timed step recorded")
    for s in timed:
        s["tokens"] = s["prompt_tokens"] + s["completion_tokens"]
        s["tokens_per_s"] = s["tokens"] / s["wall_s"]
    med = statistics.median
    return {
        "side": result["side"],
        "step_s": med(s["wall_s"] for s in timed),
        "tokens_per_s": med(s["tokens_per_s"] for s in timed),
        "tokens": med(s["tokens"] for s in timed),
        "prompt_tokens": med(s["prompt_tokens"] for s in timed),
        "completion_tokens": med(s["completion_tokens"] for s in timed),
        "samples": med(s["samples"] for s in timed),
        "gen_s": med(s["gen_s"] for s in timed),
        "reward_s": med(s["reward_s"] for s in timed),
        "train_s": med(s["train_s"] for s in timed),
        "other_s": med(s["other_s"] for s in timed),
        "threads": timed[0]["threads"],
        "activation_checkpointing": any(s.get("activation_checkpointing", False) for s in timed),
        "prompt_digests": [s["prompts"] for s in timed],
        "warmup_step_s": next(s["wall_s"] for s in result["steps"] if s["warmup"]),
    }


def drive(args: argparse.Namespace) -> None:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        sys.exit("trl is not installed in this interpreter: pip install -r bench/requirements.txt")

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    model = Path(args.model).resolve() if args.model else work / "model"
    data = Path(args.data).resolve() if args.data else work / "data"
    if not args.model:
        print(f"[bench] building the random tiny model in {model}", flush=True)
        _run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), "--out", str(model)], quiet=True)
    if not args.data:
        _run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--task", "arith", "--difficulty", "easy",
              "--out", str(data), "--train", "2000", "--test", "64"], quiet=True)

    env = dict(os.environ)
    env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    common = ["--model", str(model), "--data", str(data), "--workdir", str(work), "--steps", str(args.steps),
              "--threads", str(args.threads), "--prompts", str(args.prompts), "--n", str(args.n),
              "--max-new-tokens", str(args.max_new_tokens), "--attn", args.attn, "--seed", str(args.seed),
              *(f"--ours-set={kv}" for kv in args.ours_set)]
    code = _code_state()
    load_before = os.getloadavg()
    results = {}
    for side in args.sides:
        out = work / f"{side}.json"
        print(f"[bench] running {side} (1 warm-up + {args.steps} timed steps) ...", flush=True)
        _run([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--result", str(out), *common],
             env=env, cwd=work)
        results[side] = json.loads(out.read_text())
    load_after = os.getloadavg()

    summary = {side: _summarise(r) for side, r in results.items()}
    print()
    print(f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs; load avg before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}; "
          f"threads {args.threads}; attn {args.attn}; model {'random tiny (built)' if not args.model else model}")
    print(f"megatron-guided code: {code}")
    print(f"workload: {args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, T=1, top_p=1; "
          f"1 warm-up + {args.steps} timed step(s), medians shown")
    if args.ours_set:
        print(f"extra overrides for ours: {' '.join(args.ours_set)}")
    print()
    header = (f"{'side':<5} {'step s':>8} {'tokens':>7} {'prompt':>7} {'compl':>7} {'tokens/s':>9} "
              f"{'gen s':>7} {'reward s':>8} {'train s':>8} {'sync s':>7} {'warmup s':>8}")
    print(header)
    print("-" * len(header))
    for side, s in summary.items():
        print(f"{side:<5} {s['step_s']:>8.2f} {s['tokens']:>7.0f} {s['prompt_tokens']:>7.0f} "
              f"{s['completion_tokens']:>7.0f} {s['tokens_per_s']:>9.0f} {s['gen_s']:>7.2f} {s['reward_s']:>8.3f} "
              f"{s['train_s']:>8.2f} {s['other_s']:>7.3f} {s['warmup_step_s']:>8.2f}")
    for side, s in summary.items():
        if s["threads"] != args.threads:
            print(f"WARNING: {side} ran with {s['threads']} torch threads, not {args.threads}")
        if s["activation_checkpointing"]:
            print(f"WARNING: {side} ran with activation checkpointing on")
    if "ours" in summary and "trl" in summary:
        ours, theirs = summary["ours"], summary["trl"]
        same = ours["prompt_digests"] == theirs["prompt_digests"]
        print()
        print(f"same prompts in every timed step: {'yes' if same else 'NO'}")
        print(f"ratio tokens/s (ours / TRL): {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": results, "load_before": load_before,
                                               "load_after": load_after, "trl": trl_version, "code": code,
                                               "torch": torch.__version__,
                                               "transformers": transformers.__version__,
                                               "args": vars(args)}, indent=2, default=str))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model folder (default: build the random tiny Qwen2 in a temp dir)")
    p.add_argument("--data", help="folder with train.jsonl (default: tools/prepare_data.py arith easy, temp dir)")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention implementation, both sides")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra megatron-guided config override for our side (repeatable)")
    p.add_argument("--json", help="also write the summary and raw per-step numbers here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (model, data, outputs)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(args)
        Path(args.result).write_text(json.dumps(result))
        return
    drive(args)


if __name__ == "__main__":
    main()
