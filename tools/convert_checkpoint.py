"""HF <-> Megatron-Core checkpoint conversion; the same as `python -m megatron_guided.convert`.

    python tools/convert_checkpoint.py hf-to-mcore --hf Qwen2.5-7B --out qwen7b-mcore --tp 4 --verify
    python tools/convert_checkpoint.py mcore-to-hf --megatron ckpt/global_step_100 --out qwen7b-rl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_guided.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
