"""``python3 -m megatron_guided.train config=examples/tiny_cpu.yaml [dotted.key=value ...]``."""

from megatron_guided.train.main import main

if __name__ == "__main__":  # worker processes (spawn) re-import this module: they must not train
    main()
