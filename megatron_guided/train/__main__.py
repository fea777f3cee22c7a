"""``python3 -m megatron_guided.train config=examples/tiny_cpu.yaml [dotted.key=value ...]``."""

from megatron_guided.train.main import main

main()
