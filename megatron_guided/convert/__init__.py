"""HF ↔ Megatron-Core checkpoint conversion (docs/conversion.md).

- :mod:`.cli`: the command line (`python -m megatron_guided.convert`, `tools/convert_checkpoint.py`);
- :mod:`.to_mcore`, :mod:`.to_hf`: the two directions, streaming and atomic;
- :mod:`.session`: the meta-device GPTModel whose `sharded_state_dict()` defines the Megatron side;
- :mod:`.dist_io`, :mod:`.hf_io`: reading and writing each format tensor by tensor;
- :mod:`.guards`: refusals on mismatched configs and shapes;
- :mod:`.verify`: logits of both sides compared on real megatron-core ranks.

The names and tensor layouts come from the one mapping table, :mod:`megatron_guided.models.qwen2`.
"""
