"""Trajectory: arrays stay in step, masks and logprobs follow who produced each token."""

from __future__ import annotations

import pytest

from megatron_guided.rollout.trajectory import Trajectory, TrajectoryStatus


def make() -> Trajectory:
    return Trajectory(prompt_ids=[1, 2, 3], group_id=0, sample_seed=7, ground_truth="4")


def test_append_policy_and_context_tokens():
    traj = make()
    traj.append([10, 11], [-0.5, -0.25], trainable=True)
    traj.append([20, 21, 22], None, trainable=False)
    traj.append([12], [-1.0], trainable=True)
    assert traj.response_ids == [10, 11, 20, 21, 22, 12]
    assert traj.loss_mask == [1, 1, 0, 0, 0, 1]
    assert traj.rollout_logprobs == [-0.5, -0.25, 0.0, 0.0, 0.0, -1.0]
    assert traj.policy_token_ids == [10, 11, 12] and traj.num_policy_tokens == 3 and traj.num_turns == 2


@pytest.mark.parametrize("tokens, logprobs, trainable", [
    ([1, 2], [-0.1], True), ([1], None, True), ([1], [-0.1], False)])
def test_append_rejects_mismatched_arrays(tokens, logprobs, trainable):
    traj = make()
    with pytest.raises(ValueError):
        traj.append(tokens, logprobs, trainable=trainable)
    assert traj.response_ids == [] and traj.loss_mask == [] and traj.rollout_logprobs == []


def test_dict_round_trip():
    traj = make()
    traj.append([5, 6], [-0.1, -0.2], trainable=True)
    traj.status = TrajectoryStatus.TRUNCATED
    traj.reward, traj.reward_breakdown = 0.5, {"overall": 0.5}
    again = Trajectory.from_dict(traj.to_dict())
    assert again == traj and again.status.is_truncated()


def test_turn_spans_and_final_turn_scope():
    traj = make()
    traj.append([10, 11], [-0.5, -0.25], trainable=True)
    traj.append([20], None, trainable=False)
    traj.append([12, 13, 14], [-1.0, -1.0, -1.0], trainable=True)
    assert traj.policy_turn_spans() == [(0, 2), (3, 6)]
    traj.train_final_turn_only()
    assert traj.loss_mask == [0, 0, 0, 1, 1, 1]
    assert traj.rollout_logprobs == [0.0, 0.0, 0.0, -1.0, -1.0, -1.0]
    assert traj.response_ids == [10, 11, 20, 12, 13, 14]  # earlier turns stay as context
