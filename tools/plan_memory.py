"""Per-GPU memory of a run's trainer ranks and generation engines; refuses (exit 1) plans that do not fit.

    python tools/plan_memory.py config=examples/qwen2_5_72b_guided_grpo.yaml
    python tools/plan_memory.py config=examples/qwen2_5_7b_guided_grpo.yaml worker.actor.megatron.recompute=full

Arguments are the training command's (the config file and dotted overrides); the model's shape comes
from worker.actor.model.model_path/config.json, or from the table of known public models when the
folder is not at hand. Formulas: megatron_guided/launch/memory.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import megatron_guided  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_guided.config import ConfigError, load_config  # noqa: E402
from megatron_guided.launch.memory import format_plan, plan_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        plan = plan_memory(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan))
    return 1 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
