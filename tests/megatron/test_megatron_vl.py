"""MegatronBackend with a Qwen2.5-VL policy on real megatron-core over gloo: the vision tower beside
the GPTModel (its embeddings as decoder_input) and m-RoPE (position_embedding_type='mrope') give the
HF model's own logprobs on multi-turn, image-bearing trajectories at TP=1, TP=2, PP=2 and PP=2 × VPP=2 (fp32, 1e-5),
from HF weights and from a converted checkpoint; the weight export (vision tower included) is the exact
inverse of the load; `--verify` of a converted VL model passes at TP=2; one GRPO update (vision tower
trained too) equals TorchBackend's, and so does the second step of a run checkpointed at PP=2 and
resumed at TP=1."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_guided.config import DataConfig
from megatron_guided.data.dataset import build_prompt_dataset
from megatron_guided.models.vision import VisionProcessor, load_policy_model
from megatron_guided.rollout.trajectory import Trajectory
from megatron_guided.train.batch import build_train_batch
from tests.megatron.test_megatron_backend import (
    TEMPERATURE,
    TOL,
    UPDATE_KWARGS,
    actor_config,
    checkpointed_step,
    megatron_logprobs_and_weights,
    resumed_step,
    torch_update,
)

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def vl_setup(tiny_vl_dir, visual_data_dir, tmp_path_factory):
    """A sharpened copy of the tiny VL model on disk, and a batch of 4 two-turn trajectories."""
    model = load_policy_model(tiny_vl_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights: position errors show up as large logprob errors
        for p in model.model.language_model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    out = tmp_path_factory.mktemp("models") / "sharp-vl"
    model.save_pretrained(out)
    processor = VisionProcessor.from_pretrained(tiny_vl_dir)
    prompts = build_prompt_dataset(str(visual_data_dir / "test.jsonl"), DataConfig(max_prompt_length=256),
                                   processor.tokenizer, processor=processor)
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for i, prompt in enumerate(prompts[:4]):
        traj = Trajectory(prompt_ids=list(prompt.prompt_ids), group_id=i // 2, sample_seed=i, vision=prompt.vision)
        traj.append(torch.randint(3, 200, (5 + i,), generator=gen).tolist(), [-1.0] * (5 + i), trainable=True)
        traj.append(processor.tokenizer("<|im_end|>\n<|im_start|>user\nCheck step 1.<|im_end|>\n"
                                        "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"],
                    None, trainable=False)
        traj.append(torch.randint(3, 200, (4,), generator=gen).tolist(), [-1.0] * 4, trainable=True)
        trajs.append(traj)
    return model, out, build_train_batch(trajs, pad_token_id=0)


def hf_logprobs(model, batch) -> torch.Tensor:
    """Per row, the HF model's own forward (it derives m-RoPE positions from mm_token_type_ids)."""
    out = torch.zeros_like(batch.loss_mask)
    for i, vision in enumerate(batch.vision):
        n = int(batch.seq_lens[i])
        ids = batch.input_ids[i : i + 1, :n]
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
                           pixel_values=vision.pixel_values, image_grid_thw=vision.image_grid_thw).logits[0]
        model.model.rope_deltas = None
        logp = torch.log_softmax(logits[:-1].float() / TEMPERATURE, -1)
        out[i, : n - 1] = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return out


@pytest.mark.parametrize("layout, converted", [({}, False), ({"tp": 2}, True), ({"pp": 2}, False),
                                               ({"pp": 2, "vpp": 2}, False)],
                         ids=["tp1-hf", "tp2-converted", "pp2-hf", "pp2-vpp2-hf"])
def test_vl_logprobs_match_hf(vl_setup, tmp_path, layout, converted):
    """TP=1 loads the HF safetensors; TP=2 loads the converter's dist_ckpt folder (vision_model.* keys);
    PP=2 runs the vision tower on the first stage only and hands its decoder_input down the pipeline."""
    model, path, batch = vl_setup
    source = path
    if converted:
        from megatron_guided.convert.to_mcore import hf_to_mcore

        source = hf_to_mcore(path, tmp_path / "mcore", progress=False)
    logp, weights = megatron_logprobs_and_weights(source, layout, batch)
    mask = batch.loss_mask.bool()
    assert mask.sum() > 30
    diff = (logp[mask] - hf_logprobs(model, batch)[mask]).abs().max()
    print(f"max abs logprob diff vs HF: {float(diff):.2e}")
    assert diff < TOL
    from safetensors.torch import load_file

    saved = load_file(path / "model.safetensors")
    assert weights.keys() == saved.keys() and any(k.startswith("visual.") for k in weights)
    assert all(torch.equal(weights[n], saved[n]) for n in weights)


def test_converted_vl_verify_logits(vl_setup, tmp_path):
    from megatron_guided.convert.to_mcore import hf_to_mcore
    from megatron_guided.convert.verify import verify_logits
    from megatron_guided.megatron.layout import ParallelLayout

    _, path, _ = vl_setup
    hf_to_mcore(path, tmp_path / "mcore", layout=ParallelLayout(tp=2), progress=False)
    result = verify_logits(path, tmp_path / "mcore", ParallelLayout(tp=2), tolerance=1e-4)
    print(result.report())
    assert result.ok and result.max_abs_diff < 1e-4


def test_vl_update_matches_torch_backend(vl_setup):
    """Loss, grad norm and every updated weight (vision tower included, in saved-checkpoint names) of one
    MegatronBackend step at TP=2 equal TorchBackend's (fp32, 1e-5)."""
    from megatron_guided.config import AlgorithmConfig
    from megatron_guided.models.qwen2_5_vl import checkpoint_name
    from megatron_guided.train.megatron_backend import MegatronBackend

    model, path, batch = vl_setup
    batch.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
    expected, expected_weights = torch_update(model, batch)
    expected_weights = {checkpoint_name(n): t for n, t in expected_weights.items()}
    backend = MegatronBackend(model_path=str(path), actor=actor_config(tp=2), algorithm=AlgorithmConfig(),
                              **UPDATE_KWARGS)
    try:
        metrics = backend.train_step(batch)
        weights = dict(backend.export_weights())
    finally:
        backend.close()
    for name in ("loss", "grad_norm", "entropy"):
        assert metrics[name] == pytest.approx(expected[name], abs=TOL), name
    assert weights.keys() == expected_weights.keys() - {"lm_head.weight"}
    # the sharpened model's reduction order differs between the backends: see relative_update_errors
    initial = {checkpoint_name(k): v for k, v in model.state_dict().items()}
    rel = relative_update_errors(weights, expected_weights, initial)
    worst = max(rel, key=rel.get)
    moved = max(float((expected_weights[n] - initial[n]).abs().max()) for n in weights if n.startswith("visual."))
    print(f"update: worst relative update error {rel[worst]:.1e} ({worst}), vision tower moved {moved:.1e}")
    assert rel[worst] < 5e-3 and moved > 5e-5


def relative_update_errors(weights, expected_weights, initial) -> dict[str, float]:
    """Per tensor |W − W_expected| / |W_expected − W_initial| (Frobenius norms): Adam turns float-rounding
    differences of near-zero gradients into up to ~0.1 of a learning-rate step on single weights, so each
    tensor's update is compared as a whole."""
    return {n: float((t - expected_weights[n]).norm() / (expected_weights[n] - initial[n]).norm())
            for n, t in weights.items()}


def test_vl_checkpoint_at_pp2_resumes_at_tp1(vl_setup, tmp_path):
    """Step 1 at PP=2 (vision tower on stage 0 only), checkpoint, resume at TP=1: step 2 equals an
    uninterrupted TorchBackend run's (vision tower and Adam state included); the checkpoint's
    huggingface/ export loads as a Qwen2.5-VL."""
    from megatron_guided.config import AlgorithmConfig
    from megatron_guided.models.qwen2_5_vl import checkpoint_name
    from megatron_guided.train.torch_backend import TorchBackend

    model, path, batch = vl_setup
    first, second = batch, copy.deepcopy(batch)
    first.advantages = torch.linspace(-1, 1, batch.size)[:, None] * batch.loss_mask
    second.advantages = -first.advantages
    reference = TorchBackend(copy.deepcopy(model), actor=actor_config(), algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    reference.train_step(first)
    after_first = {checkpoint_name(n): t.clone() for n, t in reference.export_weights()}
    expected = reference.train_step(second)
    expected_weights = {checkpoint_name(n): t for n, t in reference.export_weights()}

    checkpointed_step(path, {"pp": 2}, first, tmp_path, algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    exported = load_policy_model(tmp_path / "huggingface", dtype=torch.float32)  # (the trainer adds the
    assert exported.config.model_type == "qwen2_5_vl"  # tokenizer and image processor beside it)
    metrics, weights = resumed_step(path, tmp_path, second, algorithm=AlgorithmConfig(), **UPDATE_KWARGS)
    assert metrics["loss"] == pytest.approx(expected["loss"], abs=TOL)
    assert metrics["entropy"] == pytest.approx(expected["entropy"], abs=TOL)
    assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=TOL)  # ~12 on the sharpened model
    rel = relative_update_errors(weights, expected_weights, after_first)
    worst = max(rel, key=rel.get)
    print(f"resumed step 2: worst relative update error {rel[worst]:.1e} ({worst})")
    assert rel[worst] < 5e-3
