"""PolicyOptimizer.step: the grad norm it reports is the L2 norm of the model's gradients
(float64 reference from autograd, each parameter once), and clipping scales the update as
megatron does (max_norm / (norm + 1e-6) when below 1): on Adam's first step (weight decay 0) the
clipped step is that factor times the unclipped one (Adam is scale-invariant unless eps
dominates, so the check sets eps = lr = 1e6, which makes the step ~ the gradient)."""

from __future__ import annotations

import math

import torch

from megatron_prism.config.schema import OptimizerConfig
from megatron_prism.models import build_policy
from megatron_prism.training.optimizer import PolicyOptimizer
from megatron_prism.training.runtime import wrap_ddp


def _loss(ddp, ids):
    return ddp(ids).float().log_softmax(-1)[..., 3].mean()


def _setup(source, clip):
    model = build_policy(source)
    ddp = wrap_ddp([model], distributed_optimizer=True)[0]
    # eps = lr, huge: Adam's first step is lr * g / (|g| + eps) ~ g, linear in g, so clipping shows in the update
    opt = PolicyOptimizer([ddp], OptimizerConfig(lr=1e6, clip_grad=clip, warmup_steps=0, schedule="constant",
                                                 weight_decay=0.0, adam_eps=1e6), total_steps=4, bf16=False)
    return ddp, opt


def test_reported_grad_norm_is_the_gradient_norm_and_clipping_scales_the_update(tiny_dirs):
    ids = torch.randint(0, 240, (2, 10), generator=torch.Generator().manual_seed(3))
    ref = build_policy(tiny_dirs["a"])
    ref.zero_grad()
    _loss(ref, ids).backward()
    grads = {n: p.grad.double() for n, p in ref.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))

    moves = {}
    for clip in (0.0, norm / 4):
        ddp, opt = _setup(tiny_dirs["a"], clip)
        before = {n: p.detach().double().clone() for n, p in ddp.module.named_parameters()}
        opt.zero_grad()
        _loss(ddp, ids).backward()
        result = opt.step()
        assert result.updated
        assert abs(result.grad_norm - norm) <= 1e-5 * norm, (result.grad_norm, norm)
        moves[clip] = {n: p.detach().double() - before[n] for n, p in ddp.module.named_parameters()}
    scale = (norm / 4) / (norm + 1e-6)
    name = max(grads, key=lambda n: float(grads[n].abs().max()))
    unclipped, clipped = moves[0.0][name], moves[norm / 4][name]
    assert float(unclipped.abs().max()) > 0
    assert torch.allclose(clipped, unclipped * scale, rtol=1e-3, atol=1e-7)
