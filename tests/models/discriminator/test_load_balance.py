"""PRISM's load-balancing coefficient means PRISM's strength here (models/discriminator/load_balance.py).

The reference is Hugging Face's ``load_balancing_loss_func`` (Mixtral / Qwen3-VL-MoE, the loss
PRISM's warm-up adds as ``router_aux_loss_coef * aux_loss``), re-implemented below in float64; the
other side is megatron-core's own ``switch_load_balancing_loss_func``, called once per layer as its
router does (softmax scores over all experts, top-k token counts).
"""

from __future__ import annotations

import pytest
import torch

from megatron_prism.models.discriminator.load_balance import megatron_aux_loss_coeff
from megatron_prism.models.discriminator.spec import DiscriminatorSpec, moe_config_fields


def hf_load_balancing_loss(gate_logits: list[torch.Tensor], num_experts: int, top_k: int,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF's load_balancing_loss_func: all layers' router logits concatenated, one loss."""
    logits = torch.cat(gate_logits, dim=0)  # [layers * tokens, E]
    weights = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(weights, top_k, dim=-1)
    mask = torch.nn.functional.one_hot(selected, num_experts).to(weights.dtype)  # [N, k, E]
    if attention_mask is None:
        tokens_per_expert = mask.mean(0)  # [k, E]
        prob_per_expert = weights.mean(0)  # [E]
    else:
        keep = attention_mask.reshape(-1).to(weights.dtype).repeat(len(gate_logits))  # [N]
        tokens_per_expert = (mask * keep[:, None, None]).sum(0) / keep.sum()
        prob_per_expert = (weights * keep[:, None]).sum(0) / keep.sum()
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


def megatron_total(gate_logits: list[torch.Tensor], num_experts: int, top_k: int, coeff: float) -> torch.Tensor:
    """megatron's switch loss of every layer, summed (each layer adds its own to the objective)."""
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    total = torch.zeros((), dtype=torch.float64)
    for logits in gate_logits:
        probs = torch.softmax(logits, dim=-1)
        _, top = torch.topk(logits, top_k, dim=-1)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)
        total = total + switch_load_balancing_loss_func(
            probs, routing_map.sum(0).to(probs.dtype), logits.shape[0], top_k, num_experts, coeff)
    return total


@pytest.mark.parametrize("layers,experts,topk", [(28, 4, 2), (4, 8, 2), (3, 4, 1)])
def test_converted_coefficient_gives_prisms_loss_and_gradient_when_layers_route_alike(layers, experts, topk):
    gen = torch.Generator().manual_seed(layers * 100 + experts)
    base = torch.randn(37, experts, generator=gen, dtype=torch.float64) * 2.0
    prism = 0.01
    # every layer sees the same router logits: the case where the two losses are the same function
    leaf_hf = base.clone().requires_grad_(True)
    hf = prism * hf_load_balancing_loss([leaf_hf] * layers, experts, topk)
    hf.backward()
    leaf_m = base.clone().requires_grad_(True)
    mc = megatron_total([leaf_m] * layers, experts, topk, megatron_aux_loss_coeff(prism, layers, topk))
    mc.backward()
    assert float(mc.detach()) == pytest.approx(float(hf.detach()), rel=1e-12, abs=0)
    torch.testing.assert_close(leaf_m.grad, leaf_hf.grad, rtol=1e-12, atol=1e-18)
    # unconverted, megatron's 0.01 is layers / topk times PRISM's push (14x for 28 layers, top-2)
    raw = megatron_total([base] * layers, experts, topk, prism)
    assert float(raw) / float(hf.detach()) == pytest.approx(layers / topk, rel=1e-12)


def test_balanced_values_and_average_gradient_over_layers_that_route_differently():
    layers, experts, topk, tokens = 6, 4, 2, 64
    # balanced routing: every token's top-2 is a distinct pair cycling over all experts, probabilities uniform
    pairs = [(0, 1), (2, 3), (1, 2), (3, 0)]
    logits = torch.full((tokens, experts), 0.0, dtype=torch.float64)
    for t in range(tokens):
        logits[t, list(pairs[t % 4])] = 1e-9  # picks the pair; softmax is uniform to 1e-9
    assert float(hf_load_balancing_loss([logits] * layers, experts, topk)) == pytest.approx(topk, rel=1e-8)
    assert float(megatron_total([logits], experts, topk, 1.0)) == pytest.approx(1.0, rel=1e-8)
    # layers routing differently: the gradient each layer's mean router probability gets, summed over
    # layers, is the same (HF couples layers through its all-layer means; the total push agrees)
    gen = torch.Generator().manual_seed(7)
    per_layer = [torch.randn(tokens, experts, generator=gen, dtype=torch.float64) * 3 for _ in range(layers)]
    probs_hf = [torch.softmax(x, -1).requires_grad_(True) for x in per_layer]

    def hf_of_probs(probs):  # HF's loss as a function of the probabilities (the top-k is fixed)
        counts = sum(torch.zeros(experts, dtype=torch.float64).scatter_add(
            0, torch.topk(x, topk, -1).indices.reshape(-1), torch.ones(tokens * topk, dtype=torch.float64))
            for x in per_layer) / (layers * tokens)
        return experts * (counts * torch.cat(probs).mean(0)).sum()

    (0.01 * hf_of_probs(probs_hf)).backward()
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    coeff = megatron_aux_loss_coeff(0.01, layers, topk)
    probs_m = [torch.softmax(x, -1).requires_grad_(True) for x in per_layer]
    total = sum(switch_load_balancing_loss_func(
        p, torch.zeros(experts, dtype=torch.float64).scatter_add(
            0, torch.topk(x, topk, -1).indices.reshape(-1), torch.ones(tokens * topk, dtype=torch.float64)),
        tokens, topk, experts, coeff) for p, x in zip(probs_m, per_layer))
    total.backward()
    torch.testing.assert_close(sum(p.grad.sum(0) for p in probs_m), sum(p.grad.sum(0) for p in probs_hf),
                               rtol=1e-12, atol=1e-15)


def test_the_model_config_carries_the_converted_coefficient():
    spec = DiscriminatorSpec(mode="routed", experts=4, topk=2, aux_loss_coeff=0.01)
    fields = moe_config_fields(spec, ffn_hidden_size=64, ep=1, num_layers=28)
    assert fields["moe_aux_loss_coeff"] == pytest.approx(0.01 * 2 / 28, rel=1e-15)
    assert moe_config_fields(DiscriminatorSpec(mode="dense"), 64, 1, 28) == {}
    with pytest.raises(ValueError, match="at least one MoE layer"):
        megatron_aux_loss_coeff(0.01, 0, 2)
