"""Evaluate a policy on a dataset, alone and (when the config enables one) with its verifier.

    python3 -m megatron_guided.eval config=examples/tiny_cpu_guided.yaml \
        worker.actor.model.model_path=checkpoints/megatron_guided/tiny_cpu_guided/global_step_100/huggingface \
        data.val_files=data/arith_easy/test.jsonl trainer.output_dir=outputs/eval

Sampling follows worker.rollout.val_override_config (greedy, n=1 by default). Writes one jsonl line
per sample to ``<trainer.output_dir>/eval_<mode>.jsonl`` (mode: ``policy`` or ``guided``) and prints
the mean of every reward key per mode.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from megatron_guided.config import ConfigError, load_config
from megatron_guided.logging import setup_logging
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.main import build_trainer
from megatron_guided.train.trainer import Trainer, mean_breakdown

log = logging.getLogger("megatron_guided.eval")


def evaluate(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Per mode, the mean reward breakdown; per-sample results go to jsonl files."""
    cfg = trainer.cfg
    if trainer.val_data is None:
        raise ConfigError("data.val_files: the dataset to evaluate on is required")
    override = cfg.worker.rollout.val_override_config
    prompts = list(trainer.val_data)
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    modes = ["policy"] + (["guided"] if trainer.guided is not None else [])
    for mode in modes:
        trajectories = trainer.validation_rollout(guided=mode == "guided", temperature=override.temperature,
                                                  top_p=override.top_p, n=override.n)
        write_samples(out_dir / f"eval_{mode}.jsonl", trajectories, prompts, trainer.tokenizer)
        results[mode] = mean_breakdown(trajectories) | {
            "turns_mean": sum(t.num_turns for t in trajectories) / len(trajectories)}
    return results


def write_samples(path: Path, trajectories: list[Trajectory], prompts, tokenizer) -> None:
    with open(path, "w") as handle:
        for traj in trajectories:
            prompt = prompts[traj.group_id]
            handle.write(json.dumps({
                "source": prompt.source, "sample": traj.extra["slot"],
                "ground_truth": traj.ground_truth,
                "dialogue": tokenizer.decode(traj.response_ids, skip_special_tokens=False),
                "policy_text": tokenizer.decode(traj.policy_token_ids, skip_special_tokens=True),
                "status": traj.status.value, "num_turns": traj.num_turns,
                "num_corrections": traj.num_corrections, "hallucination_flags": traj.hallucination_flags,
                "reward": traj.reward, **{f"reward/{k}": v for k, v in traj.reward_breakdown.items()},
            }) + "\n")
    log.info("wrote %d samples to %s", len(trajectories), path)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        trainer = build_trainer(cfg)
        try:
            results = evaluate(trainer)
        finally:
            trainer.close()
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    for mode, metrics in results.items():
        print(f"{mode}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    main()
