"""worker.rollout.engine / worker.rollout.sglang.* / worker.rollout.verifier.{engine,sglang}: bad values
fail at start with the dotted key."""

from __future__ import annotations

import pytest

from megatron_guided.config import ConfigError, load_config
from megatron_guided.rollout.batcher import AsyncBatchGenerator, async_generator
from megatron_guided.rollout.sglang.engine import SGLangEngine
from megatron_guided.rollout.sglang.server import SGLangServer
from tests.servers.sglang_stub import SGLangStub


@pytest.mark.parametrize(("override", "message"), [
    ("worker.rollout.engine=vllm", "worker.rollout.engine='vllm' is not one of"),
    ("worker.rollout.verifier.engine=tgi", "worker.rollout.verifier.engine='tgi'"),
    ("worker.rollout.sglang.device=tpu", "worker.rollout.sglang.device='tpu'"),
    ("worker.rollout.sglang.weight_sync=nfs", "worker.rollout.sglang.weight_sync='nfs'"),
    ("worker.rollout.sglang.num_replicas=0", "worker.rollout.sglang.num_replicas=0 must be >= 1"),
    ("worker.rollout.verifier.sglang.mem_fraction_static=1.5", "verifier.sglang.mem_fraction_static=1.5"),
    ("worker.rollout.sglang.urls=[localhost:30000]", "worker.rollout.sglang.urls: 'localhost:30000'"),
    ("worker.rollout.sglang.pause_mode=stop", "worker.rollout.sglang.pause_mode='stop'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_gpu_only_weight_sync_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="weight_sync=tensor needs GPUs; set worker.rollout.sglang.weight_sync=disk"):
        load_config(["worker.rollout.sglang.device=cpu", "worker.rollout.sglang.weight_sync=tensor"])


def test_the_old_rollout_name_key_is_gone():
    with pytest.raises(ConfigError, match="name"):
        load_config(["worker.rollout.name=hf"])


def test_async_callers_batch_in_process_engines_but_not_served_ones(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from megatron_guided.rollout.hf_engine import HFEngine

    hf = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert isinstance(async_generator(hf), AsyncBatchGenerator)
    with SGLangStub() as stub:
        served = SGLangEngine([SGLangServer(url=stub.base_url)], vocab_size=None)
        try:
            front = async_generator(served)
            assert not isinstance(front, AsyncBatchGenerator) and front.engine is served
        finally:
            served.close()
