"""Advantage estimators against per-group loops written from the papers' formulas (float64)."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_prism.algorithms import compute_advantages, grpo_advantages
from megatron_prism.registry import UnknownNameError


def _groups(seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 1, 3, 8, 2]
    ids = [f"prompt-{i}" for i, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(ids), generator=g).tolist()  # group members need not be adjacent
    ids = [ids[i] for i in perm]
    rewards = torch.rand(len(ids), generator=g, dtype=torch.float64)
    rewards[[i for i, x in enumerate(ids) if x == "prompt-4"]] = 1.0  # a uniform group: std 0
    return rewards, ids


def _members(ids, i):
    return [j for j, x in enumerate(ids) if x == ids[i]]


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_matches_group_formula(seed):
    rewards, ids = _groups(seed)
    eps = 1e-6
    adv = grpo_advantages(rewards, ids, eps=eps)
    for i in range(len(ids)):
        group = [float(rewards[j]) for j in _members(ids, i)]
        if len(group) == 1:
            expected = 0.0
        else:
            expected = (float(rewards[i]) - statistics.mean(group)) / (statistics.stdev(group) + eps)
        assert float(adv[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_drgrpo_rloo_and_reinforce_pp():
    rewards, ids = _groups(3)
    drgrpo = compute_advantages("drgrpo", rewards, ids)
    rloo = compute_advantages("rloo", rewards, ids)
    rpp = compute_advantages("reinforce_plus_plus_baseline", rewards, ids)
    centred = []
    for i in range(len(ids)):
        members = _members(ids, i)
        group = [float(rewards[j]) for j in members]
        others = [float(rewards[j]) for j in members if j != i]
        if len(group) == 1:
            assert float(drgrpo[i]) == 0.0 and float(rloo[i]) == 0.0 and float(rpp[i]) == 0.0
            centred.append(0.0)
            continue
        assert float(drgrpo[i]) == pytest.approx(float(rewards[i]) - statistics.mean(group), abs=1e-12)
        assert float(rloo[i]) == pytest.approx(float(rewards[i]) - statistics.mean(others), abs=1e-12)
        centred.append(float(rewards[i]) - statistics.mean(group))
    mu, sd = statistics.mean(centred), statistics.stdev(centred)
    for i, c in enumerate(centred):
        if len(_members(ids, i)) > 1:
            assert float(rpp[i]) == pytest.approx((c - mu) / (sd + 1e-6), abs=1e-9)


def test_integer_tensor_group_ids_and_dtype():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float32)
    adv = grpo_advantages(rewards, torch.tensor([7, 7, 3, 3]))
    assert adv.dtype == torch.float32
    assert adv[0] > 0 > adv[1] and adv[2] == 0 and adv[3] == 0  # a uniform group gets 0


def test_bad_inputs_are_named():
    with pytest.raises(UnknownNameError, match="did you mean 'grpo'"):
        compute_advantages("gpro", torch.zeros(2), [0, 0])
    with pytest.raises(ValueError, match="3 rewards but 2 group ids"):
        grpo_advantages(torch.zeros(3), [0, 1])
