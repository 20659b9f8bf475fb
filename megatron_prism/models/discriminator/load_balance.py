"""The load-balancing coefficient: PRISM's value, converted once into megatron's.

``discriminator.aux_loss_coef`` means what PRISM's ``router_aux_loss_coef`` means
(``moe/create_vl_moe.py`` sets 0.01; ``moe/train_moe_vl_warmup_fast.py`` trains on
``pairwise_loss + router_aux_loss_coef * outputs.aux_loss``). The two libraries define the loss
differently, so the same number is a different push; :func:`megatron_aux_loss_coeff` is the one
place that converts.

Notation: E experts, top-k routing, L MoE layers, T tokens; per layer l and expert e,
``P[l,e]`` = mean over tokens of the router's softmax probability of e (over all E experts), and
``F[l,e]`` = fraction of tokens whose top-k contains e (so sum_e F[l,e] = k).

* Hugging Face ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE, Qwen3-VL-MoE) concatenates the
  router logits of *all* layers into one ``[L*T, E]`` batch and returns one loss::

      hf = E * sum_e Fbar[e] * Pbar[e],   Fbar[e] = mean_l F[l,e],   Pbar[e] = mean_l P[l,e]

  which is ``k`` when routing is balanced (F = k/E, P = 1/E).
* megatron's ``switch_load_balancing_loss_func`` is computed in every MoE layer and each layer's
  loss is added to the objective (its gradient attached in that layer)::

      mcore_l = (E / k) * sum_e F[l,e] * P[l,e]            (1 when balanced),  total = sum_l mcore_l

Only P carries a gradient (F comes from a top-k). Where every layer routes alike
(``F[l,e] = F[e]``, ``P[l,e] = P[e]``)::

      hf = E * sum_e F[e] P[e]          total mcore = L * (E / k) * sum_e F[e] P[e]

so ``c_hf * hf == c_mcore * total`` -- the same loss and the same gradient in every router -- exactly
when ``c_mcore = c_hf * k / L``. (When layers route differently HF's loss also couples layers
through Fbar, Pbar; the gradient it sends layer l is ``c_hf * E / L**2 * sum_l' F[l',e]``, and the
converted megatron loss sends ``c_hf * E / L * F[l,e]``: equal on average over layers.) Left
unconverted, megatron's 0.01 pushes each router ``L / k`` times harder than PRISM's (14x for the
28-layer Qwen3-VL-2B discriminator, top-2).
"""

from __future__ import annotations


def megatron_aux_loss_coeff(prism_coeff: float, num_moe_layers: int, topk: int) -> float:
    """megatron's per-layer ``moe_aux_loss_coeff`` that gives PRISM's (HF's) ``router_aux_loss_coef``
    strength: ``prism_coeff * topk / num_moe_layers`` (module docstring derives it)."""
    if num_moe_layers < 1 or topk < 1:
        raise ValueError(f"need at least one MoE layer and top-1 routing, got {num_moe_layers} layers, top-{topk}")
    return prism_coeff * topk / num_moe_layers
