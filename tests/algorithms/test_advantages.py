"""Advantage estimators against per-group loops written from the papers' formulas (float64)."""

from __future__ import annotations

import statistics
import threading

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
    mu, var = statistics.mean(centred), statistics.variance(centred)
    for i, c in enumerate(centred):
        if len(_members(ids, i)) > 1:  # verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8)
            assert float(rpp[i]) == pytest.approx((c - mu) / (var + 1e-8) ** 0.5, abs=1e-12)


class _ThreadAllReduce:
    """A sum all-reduce between threads (each thread one data-parallel rank): every call blocks
    until all ranks made theirs, then each gets the sum."""

    def __init__(self, ranks: int):
        self.barrier = threading.Barrier(ranks)
        self.lock = threading.Lock()
        self.rounds: dict[int, list] = {}
        self.calls = threading.local()

    def __call__(self, t):
        n = getattr(self.calls, "n", 0)
        self.calls.n = n + 1
        with self.lock:
            self.rounds.setdefault(n, []).append(t.clone())
        self.barrier.wait()
        return sum(self.rounds[n])


def _verl_rf_pp_baseline(rewards, ids, lengths):
    """verl's estimator as its loop reads, with this project's groups of one set to 0: centre by
    the group mean, repeat each response's value over its tokens, whiten over all tokens."""
    centred = []
    for i in range(len(ids)):
        group = [float(rewards[j]) for j in _members(ids, i)]
        centred.append(float(rewards[i]) - statistics.mean(group) if len(group) > 1 else 0.0)
    tokens = [c for c, n in zip(centred, lengths) for _ in range(n)]
    mu, var = statistics.mean(tokens), statistics.variance(tokens)
    return [(c - mu) / (var + 1e-8) ** 0.5 if len(_members(ids, i)) > 1 else 0.0 for i, c in enumerate(centred)]


@pytest.mark.parametrize("seed", [4, 5])
def test_reinforce_pp_baseline_whitens_over_the_global_batch_of_tokens(seed):
    """With response lengths the whitening is verl's (over tokens); split over two data-parallel
    ranks (whole groups each) with a sum all-reduce, every rank's advantages are the one-process
    result: they no longer depend on the DP size."""
    rewards, ids = _groups(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (len(ids),), generator=g)
    whole = compute_advantages("reinforce_plus_plus_baseline", rewards, ids, response_lengths=lengths)
    for i, want in enumerate(_verl_rf_pp_baseline(rewards, ids, lengths.tolist())):
        assert float(whole[i]) == pytest.approx(want, abs=1e-12)
    names = sorted(set(ids))
    shards = [[i for i, x in enumerate(ids) if x in names[0::2]], [i for i, x in enumerate(ids) if x in names[1::2]]]
    reduce = _ThreadAllReduce(2)
    results: dict[int, torch.Tensor] = {}

    def rank(r):
        rows = shards[r]
        results[r] = compute_advantages("reinforce_plus_plus_baseline", rewards[rows], [ids[i] for i in rows],
                                        response_lengths=lengths[rows], all_reduce=reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r, rows in enumerate(shards):
        torch.testing.assert_close(results[r], whole[rows], rtol=0, atol=1e-12)
    # without the all-reduce each rank whitens its own half: a different result
    alone = compute_advantages("reinforce_plus_plus_baseline", rewards[shards[0]], [ids[i] for i in shards[0]],
                               response_lengths=lengths[shards[0]])
    assert (alone - whole[shards[0]]).abs().max() > 1e-3
    # estimators that work per group ignore the batch arguments
    torch.testing.assert_close(compute_advantages("grpo", rewards, ids, response_lengths=lengths, all_reduce=reduce),
                               grpo_advantages(rewards, ids))


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
