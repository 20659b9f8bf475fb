"""A packed SFT row gives each sample the same loss as running it alone (tiny Qwen3-VL, TP=1)."""

from __future__ import annotations

import pytest
import torch

from megatron_prism.data.packing import VisionTokens, next_token_targets_from_labels, pack_demonstrations
from megatron_prism.data.processing import IGNORE_INDEX
from megatron_prism.models import build_policy
from megatron_prism.models.qwen3vl.model import HeadRequest
from megatron_prism.models.qwen3vl.tiny import TOKENS
from tests.models.cases import demonstration

VISION = VisionTokens(TOKENS["image_token_id"], TOKENS["video_token_id"], spatial_merge_size=2)


def _mean_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    mask = targets != IGNORE_INDEX
    return -(logp * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def examples():
    gen = torch.Generator().manual_seed(3)
    return [
        demonstration(gen, "s0", [[1, 4, 4]], 5, 9),
        demonstration(gen, "s1", [], 7, 6),
        demonstration(gen, "s2", [[1, 2, 6], [1, 4, 2]], 3, 11),
        demonstration(gen, "s3", [[1, 4, 4]], 4, 8),
    ]


def test_packed_row_matches_unpacked_samples(examples, tiny_dirs):
    model = build_policy(tiny_dirs["a"]).eval()
    rows = pack_demonstrations(examples, max_length=64, vision=VISION, pad_id=0, pad_to_multiple_of=8)
    assert [r.sample_ids for r in rows] == [["s0", "s1", "s2"], ["s3"]]  # s3 no longer fits in 64
    row = rows[0]
    assert row.input_ids.shape[1] % 8 == 0 and row.cu_seqlens.tolist() == [0] + [e for _, e in row.spans]

    def run(ids, targets, **kw):
        with torch.no_grad():
            return model(ids, head=HeadRequest(targets, backend="reference"), **kw).logp

    packed = run(row.input_ids, row.targets, pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw,
                 attention_mask=row.attention_mask, position_ids=row.position_ids)
    for (start, end), ex in zip(row.spans, examples):
        alone_targets = next_token_targets_from_labels(ex.labels)[None]
        alone = run(ex.input_ids[None], alone_targets, pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw)
        packed_loss = _mean_nll(packed[:, start:end], row.targets[:, start:end])
        torch.testing.assert_close(packed_loss, _mean_nll(alone, alone_targets), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)

    # Control: a plain causal mask (no isolation) lets later samples see earlier ones.
    leaky = run(row.input_ids, row.targets, pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw,
                position_ids=row.position_ids,
                attention_mask=~torch.ones(row.input_ids.shape[1], row.input_ids.shape[1], dtype=torch.bool).tril()[None, None])
    start, end = row.spans[2]
    assert not torch.allclose(leaky[:, start:end], packed[:, start:end], atol=1e-4)


def test_targets_never_cross_a_seam(examples):
    rows = pack_demonstrations(examples, max_length=200, vision=VISION, pad_id=0)
    row = rows[0]
    for _, end in row.spans:
        assert row.targets[0, end - 1] == IGNORE_INDEX  # the last token of a sample predicts nothing
    # position i predicts token i + 1: the last prompt token predicts the first response token
    response_tokens = sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)
    assert int((row.targets != IGNORE_INDEX).sum()) == response_tokens
    with pytest.raises(ValueError, match="above the packing length 10"):
        pack_demonstrations(examples, max_length=10, vision=VISION, pad_id=0)
