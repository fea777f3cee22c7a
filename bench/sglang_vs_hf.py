"""The same guided rollout batch through the SGLang engine and through the in-process HF engine:
policy tokens/s for each, the ratio SGLang ÷ HF, and the radix/session cache reuse of re-sent context.

Run from the repo root, with the SGLang venv built (README, "SGLang engine")::

    SGLANG_PYTHON=.venv-sglang/bin/python python bench/sglang_vs_hf.py
    SGLANG_PYTHON=.venv-sglang/bin/python python bench/sglang_vs_hf.py --prompts 64 --repeats 3 --json out.json

Workload: ``--prompts`` toy-arithmetic problems (test split of ``tools/prepare_data.py``), one greedy
sample each (greedy, so both engines produce the same dialogues and do the same work), guided by the
exact step checker (``examples/verifier_function/arith_step_checker.py``) for up to ``--max-turns``
policy turns of at most ``--tokens-per-turn`` tokens. ``--task visual``: the toy visual task (the start
number only in the image) on a tiny Qwen2.5-VL with 14-pixel patches (what SGLang serves), guided by the
visual step checker, so every turn re-sends the image. Each engine runs one warm-up batch, then
``--repeats`` timed batches (median reported). The SGLang server gets ``--threads`` OpenMP threads, the
HF engine ``torch.set_num_threads(--threads)``; the server is stopped before the HF side runs. Default
model: the random tiny Qwen2 of ``tools/make_tiny_model.py`` built in a temp folder (``--model DIR``
for another).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_guided.config import DataConfig, SGLangConfig, VerifierConfig
from megatron_guided.data.dataset import build_prompt_dataset
from megatron_guided.rollout.batcher import async_generator
from megatron_guided.rollout.engine import GenerationEngine, SamplingParams
from megatron_guided.rollout.guided import ChatDelta, GuidedRollout
from megatron_guided.verifier.function import FunctionVerifier

TASKS = {  # task: (tools/make_tiny_model.py args, tools/prepare_data.py args, step checker)
    "arith": ([], ["--task", "arith", "--difficulty", "easy"],
              "examples/verifier_function/arith_step_checker.py:verify"),
    "visual": (["--arch", "qwen2_5_vl", "--patch-size", "14"], ["--task", "visual_arith"],
               "examples/verifier_function/visual_arith_checker.py:verify"),
}


def guided_batch(engine: GenerationEngine, tokenizer, prompts, *, checker: str, max_turns: int,
                 tokens_per_turn: int, seed: int = 1) -> dict[str, float]:
    """One guided rollout of ``prompts`` (one greedy sample each) through ``engine``: wall time, policy
    tokens, and the guided rollout's metrics (``engine/prefix_reuse`` among them)."""
    cfg = VerifierConfig(enable=True, type="function", function=str(REPO / checker), max_turns=max_turns,
                         max_tokens_per_turn=tokens_per_turn, max_trajectory_tokens=max_turns * tokens_per_turn * 3)
    guided = GuidedRollout(generator=async_generator(engine), verifier=FunctionVerifier.from_config(cfg), cfg=cfg,
                           delta=ChatDelta(tokenizer=tokenizer, end_of_turn_id=tokenizer.eos_token_id),
                           decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                           max_response_length=tokens_per_turn)
    try:
        sampling = SamplingParams(max_new_tokens=tokens_per_turn, temperature=0.0)
        engine.flush_cache()  # nothing cached from an earlier batch: reuse within this batch only
        start = time.perf_counter()
        trajectories = guided.loop.run_until_complete(guided.run(prompts, n=1, sampling=sampling, base_seed=seed,
                                                                 step=0, show_reference=True))
        seconds = time.perf_counter() - start
        metrics = guided.collect_metrics(trajectories)
    finally:
        guided.close()
    tokens = sum(t.num_policy_tokens for t in trajectories)
    return metrics | {"seconds": seconds, "policy_tokens": tokens, "tokens_per_s": tokens / seconds,
                      "dialogues": [t.response_ids for t in trajectories]}


def load_prompts(data_dir: Path, tokenizer, count: int, *, processor=None):
    data = build_prompt_dataset(str(data_dir / "test.jsonl"), DataConfig(max_prompt_length=256), tokenizer,
                                processor=processor)
    return [data[i] for i in range(min(count, len(data)))]


def measure(engine: GenerationEngine, tokenizer, prompts, args) -> list[dict]:
    kwargs = dict(checker=TASKS[args.task][2], max_turns=args.max_turns, tokens_per_turn=args.tokens_per_turn)
    guided_batch(engine, tokenizer, prompts[: max(1, len(prompts) // 4)], **kwargs)  # warm-up
    return [guided_batch(engine, tokenizer, prompts, **kwargs) for _ in range(args.repeats)]


def summary(runs: list[dict]) -> dict[str, float]:
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "policy_tokens": runs[0]["policy_tokens"], "turns_mean": runs[0]["guided/turns_mean"],
            "prefix_reuse": statistics.median(r.get("engine/prefix_reuse", 0.0) for r in runs)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="arith")
    p.add_argument("--model", help="HF model folder (default: the task's random tiny model, built in a temp folder)")
    p.add_argument("--data", help="folder with test.jsonl (default: generated toy arithmetic)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--tokens-per-turn", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sglang-python", default=os.environ.get("SGLANG_PYTHON", sys.executable))
    p.add_argument("--json", help="write the summary and raw runs here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from megatron_guided.models.vision import VisionProcessor, load_policy_model
    from megatron_guided.rollout.hf_engine import HFEngine
    from megatron_guided.rollout.sglang.engine import SGLangEngine
    from tools import make_tiny_model, prepare_data

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the SGLang server
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_args, data_args, _ = TASKS[args.task]
        model_dir = Path(args.model) if args.model else Path(tmp) / "tiny-model"
        if not args.model:
            make_tiny_model.main([*model_args, "--out", str(model_dir)])
        data_dir = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            prepare_data.main([*data_args, "--out", str(data_dir), "--train", "10", "--test", str(args.prompts),
                               "--seed", "0"])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        processor = VisionProcessor.from_pretrained(model_dir, tokenizer=tokenizer) if args.task == "visual" else None
        prompts = load_prompts(data_dir, tokenizer, args.prompts, processor=processor)

        cfg = SGLangConfig(device="cpu", dtype="float32", mem_fraction_static=0.05, python=args.sglang_python,
                           pythonpath=[str(REPO / "tests" / "sglang_stubs")],
                           extra_args=["--max-total-tokens", "65536"])
        start = time.perf_counter()
        sglang = SGLangEngine.from_config(cfg, model_path=str(model_dir), log_dir=Path(tmp) / "logs", frozen=True)
        startup_s = time.perf_counter() - start
        try:
            sglang_runs = measure(sglang, tokenizer, prompts, args)
        finally:
            sglang.close()

        model = load_policy_model(model_dir, dtype=torch.float32)
        hf = HFEngine(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                      decode=tokenizer.decode)
        hf_runs = measure(hf, tokenizer, prompts, args)

    same = sum(a == b for a, b in zip(sglang_runs[0]["dialogues"], hf_runs[0]["dialogues"]))
    result = {"sglang": summary(sglang_runs), "hf": summary(hf_runs), "sglang_startup_s": startup_s,
              "identical_dialogues": f"{same}/{len(prompts)}"}
    result["ratio_sglang_over_hf"] = result["sglang"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    print(f"{args.task} guided batch: {len(prompts)} prompts x 1 greedy sample, <= {args.max_turns} turns x "
          f"{args.tokens_per_turn} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'engine':8} {'tok/s':>8} {'seconds':>8} {'tokens':>7} {'turns':>6} {'prefix_reuse':>12}")
    for name in ("sglang", "hf"):
        r = result[name]
        print(f"{name:8} {r['tokens_per_s']:8.1f} {r['seconds']:8.2f} {r['policy_tokens']:7d} "
              f"{r['turns_mean']:6.2f} {r['prefix_reuse']:12.3f}")
    print(f"SGLang / HF throughput: {result['ratio_sglang_over_hf']:.2f}x; identical dialogues "
          f"{result['identical_dialogues']}; SGLang server ready in {startup_s:.1f} s")
    if args.json:
        strip = [{k: v for k, v in r.items() if k != "dialogues"} for r in sglang_runs + hf_runs]
        Path(args.json).write_text(json.dumps(result | {"runs": strip}, indent=1))


if __name__ == "__main__":
    main()
