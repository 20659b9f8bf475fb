"""The discriminator at TP=2 with sequence parallelism and at EP=2 (alltoall dispatcher) scores as
at TP=1, with the same head and router gradients (aux loss included) and expert loads; gloo under
torchrun, float32; tolerance 1e-5 relative to the largest value (router gradients 5e-5)."""

from __future__ import annotations

import pytest
import torch
from disc_cases import batch, run_worker
from safetensors.torch import load_file

from megatron_prism.models.discriminator import build_discriminator

TOL = 1e-5  # scores, head gradient, loads
GRAD_TOL = 5e-5  # router gradients: top-k softmax + aux loss summed in another order over TP ranks


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    scale = ref.abs().max().clamp(min=1e-12)
    err = float((got.double() - ref.double()).abs().max() / scale)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="module")
def reference(disc_ckpt):
    """TP=1 in this process: scores, head/router gradients, loads."""
    b = batch(seed=3)
    weights = torch.tensor([[1.0, -0.5]] * b.input_ids.shape[0])
    model = build_discriminator(disc_ckpt, head_dropout=0.0, router_jitter=0.0)
    scores = model(b.input_ids, **b.model_inputs())
    (scores * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.global_named_parameters()
             if n == "score_head.weight" or n.endswith("router.weight")}
    return b, weights, scores.detach(), grads, model.moe_stats()


@pytest.mark.parametrize("flags", [["--tp", "2", "--sp"], ["--ep", "2", "--dispatcher", "alltoall"]], ids=["tp2-sp", "ep2"])
def test_layout_matches_tp1(flags, disc_ckpt, reference, tmp_path):
    b, weights, scores, grads, stats = reference
    data = {"input_ids": b.input_ids, "pixel_values": b.pixel_values, "image_grid_thw": b.image_grid_thw,
            "attention_mask": b.attention_mask, "position_ids": b.position_ids, "part_labels": b.part_labels,
            "score_positions": b.score_positions, "weights": weights}
    torch.save(data, tmp_path / "inputs.pt")
    run_worker(2, disc_ckpt, tmp_path / "inputs.pt", tmp_path / "out", *flags)
    for rank in range(2):
        got = load_file(tmp_path / "out" / f"rank{rank}.safetensors")
        _close(got["scores"], scores, f"scores rank {rank}")
        # Every EP rank scores the same batch, so the data-parallel gradient sum is dp x TP=1's.
        dp = int(got["dp"])
        assert grads and set(grads) <= set(got)
        for name, g in grads.items():
            assert g.abs().sum() > 0, name
            _close(got[name] / dp, g, name, GRAD_TOL if name.endswith("router.weight") else TOL)
        # Loads count this rank's own tokens (summed over TP ranks, which see sequence slices).
        _close(got["load"], stats["load"], "expert load")
        assert float(got["load"].sum()) > 0
