"""The ALIGN game advantage ``prism_game`` on constructed groups (all invalid, exactly one valid,
ties, singletons, mixed), a case computed by hand, and random groups against a per-group loop
written from PRISM's formula (float64)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_prism.algorithms import compute_advantages, prism_game_advantages


def _adv(scores, groups, invalid, **kw):
    return prism_game_advantages(torch.tensor(scores, dtype=torch.float64), groups,
                                 invalid=torch.tensor(invalid, dtype=torch.bool), **kw)


def test_hand_computed_group():
    # One group of three: two valid responses, one invalid (its scores are ignored).
    # caption: [1, 3, min(1,3) - 1 = 0]; reasoning: [2, 0, min(2,0) - 1 = -1]. Both columns have
    # deviations that are a permutation of (-1/3, 5/3, -4/3), so std = sqrt((1 + 25 + 16) / 9 / 2)
    # = sqrt(21) / 3 for both.
    adv = _adv([[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]], ["q", "q", "q"], [False, False, True], eps=0.0)
    std = math.sqrt(21) / 3
    gn_cap = [(-1 / 3) / std, (5 / 3) / std, (-4 / 3) / std]
    gn_rea = [(5 / 3) / std, (-1 / 3) / std, (-4 / 3) / std]
    expected = [0.5 * c + 0.5 * r for c, r in zip(gn_cap, gn_rea)]
    expected[2] -= 1.5
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)


def test_all_invalid_group_gets_only_the_penalty():
    adv = _adv([[3.0, -4.0], [1.0, 9.0], [0.0, 0.0]], [1, 1, 1], [True, True, True])
    assert adv.tolist() == [-1.5, -1.5, -1.5]


@pytest.mark.parametrize("score", [-10.0, 0.0, 4.2])
def test_exactly_one_valid_response(score):
    # adjusted scores [s, s-1, s-1] in both parts: mean s - 2/3, std sqrt(1/3) whatever s is
    adv = _adv([[score, score], [50.0, -50.0], [0.3, 0.1]], [0, 0, 0], [False, True, True], eps=0.0)
    std = math.sqrt(1 / 3)
    assert adv[0] == pytest.approx((2 / 3) / std, rel=1e-12)
    assert adv[1] == pytest.approx((-1 / 3) / std - 1.5, rel=1e-12)
    assert adv[2] == adv[1]


def test_ties_and_zero_variance_give_exactly_zero():
    adv = _adv([[0.1, 0.7]] * 5, [0] * 5, [False] * 5)
    assert adv.tolist() == [0.0] * 5  # not a rounding residue divided by eps
    # one part tied, the other not: only the untied part contributes
    adv = _adv([[0.1, 1.0], [0.1, 3.0]], [0, 0], [False, False], eps=0.0)
    assert adv.tolist() == pytest.approx([0.5 * -1 / math.sqrt(2), 0.5 * 1 / math.sqrt(2)], rel=1e-12)


def test_singleton_groups():
    adv = _adv([[5.0, 5.0], [5.0, 5.0]], ["a", "b"], [False, True])
    assert adv.tolist() == [0.0, -1.5]


def test_scores_are_clipped_first():
    clipped = _adv([[25.0, 0.0], [-30.0, 1.0], [0.0, 2.0]], [0, 0, 0], [False] * 3, score_clip=10.0)
    same = _adv([[10.0, 0.0], [-10.0, 1.0], [0.0, 2.0]], [0, 0, 0], [False] * 3, score_clip=None)
    assert clipped.tolist() == pytest.approx(same.tolist(), rel=1e-15)


def _loop_reference(scores, groups, invalid, weights, penalty, offset, clip, eps):
    """PRISM's estimator per group, with statistics.stdev (Bessel) and the documented exceptions
    (singleton or constant group: 0)."""
    out = [0.0] * len(groups)
    for gid in set(groups):
        rows = [i for i, g in enumerate(groups) if g == gid]
        for p, w in enumerate(weights):
            x = {i: max(-clip, min(clip, scores[i][p])) for i in rows}
            valid = [x[i] for i in rows if not invalid[i]]
            floor = (min(valid) if valid else 0.0) - offset
            adj = [floor if invalid[i] else x[i] for i in rows]
            if len(rows) == 1 or max(adj) == min(adj):
                continue
            mu, sd = statistics.mean(adj), statistics.stdev(adj)
            for i, a in zip(rows, adj):
                out[i] += w * (a - mu) / (sd + eps)
        for i in rows:
            out[i] -= penalty * invalid[i]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_random_groups_match_the_loop(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [16, 4, 1, 7, 3]
    groups = [f"p{k}" for k, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(groups), generator=g).tolist()  # members need not be adjacent
    groups = [groups[i] for i in perm]
    scores = (torch.randn(len(groups), 2, generator=g, dtype=torch.float64) * 8).tolist()  # some beyond the clip
    invalid = (torch.rand(len(groups), generator=g) < 0.35).tolist()
    invalid[groups.index("p4")] = True
    weights, penalty, offset, clip, eps = (0.3, 0.7), 2.0, 0.5, 10.0, 1e-6
    adv = compute_advantages("prism_game", torch.tensor(scores, dtype=torch.float64), groups,
                             invalid=torch.tensor(invalid), weights=weights, invalid_penalty=penalty,
                             invalid_offset=offset, score_clip=clip, eps=eps)
    expected = _loop_reference(scores, groups, invalid, weights, penalty, offset, clip, eps)
    assert adv.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a valid response always ranks above every invalid one of its group
    for gid in set(groups):
        rows = [i for i, x in enumerate(groups) if x == gid]
        val = [float(adv[i]) for i in rows if not invalid[i]]
        inv = [float(adv[i]) for i in rows if invalid[i]]
        if val and inv:
            assert min(val) > max(inv)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"part scores \[B, P\]"):
        prism_game_advantages(torch.zeros(3), [0, 0, 0], invalid=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        prism_game_advantages(torch.zeros(3, 2), [0, 0, 0], invalid=torch.zeros(3, dtype=torch.bool), weights=(1.0,))
    with pytest.raises(ValueError, match="invalid must be"):
        prism_game_advantages(torch.zeros(3, 2), [0, 0, 0], invalid=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="group ids"):
        prism_game_advantages(torch.zeros(3, 2), [0, 0], invalid=torch.zeros(3, dtype=torch.bool))
