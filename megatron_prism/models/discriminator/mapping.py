"""The discriminator's name/shape map: the policy's map with the MLPs made experts, plus router and head.

Each :class:`ParamMap` names a megatron parameter (global: whole-model layer index, global expert
index) and the "HF-side" tensors it is made of. For the parts a dense Qwen3-VL does not have we use
Qwen3-MoE's Hugging Face names, so a discriminator checkpoint reshards through the same code as a
policy checkpoint (:class:`~megatron_prism.models.conversion.megatron_format.MegatronWeights`):

* router of layer i: ``model.language_model.layers.{i}.mlp.gate.weight`` ``[E, h]`` (replicated);
* expert e of layer i: ``...layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (split like
  the dense MLP: gate_up rows, down columns, over the expert tensor-parallel ranks);
* score head: ``score_head.weight`` ``[1, h]`` (replicated, last pipeline stage).

The discriminator reads hidden states only, so it has no output layer (and its embedding is never
tied). Under expert parallelism EP rank r holds experts ``[r*E/ep, (r+1)*E/ep)`` as
``local_experts.{0..E/ep-1}``; :func:`local_expert_name` / :func:`global_expert_name` translate.
"""

from __future__ import annotations

import re

from megatron_prism.models.conversion.mapping import LM, ParamMap, all_maps, expected_vision_shapes
from megatron_prism.models.discriminator.spec import DiscriminatorSpec

HEAD = "score_head.weight"
_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")


def _is_dense_mlp(m: ParamMap) -> bool:
    # (the vision tower's MLPs use the same megatron-style names and stay dense)
    return m.megatron.startswith("language_model.decoder.layers.") and m.megatron.endswith(
        (".mlp.linear_fc1.weight", ".mlp.linear_fc2.weight"))


def expert_hf_names(layer: int, expert: int) -> dict[str, tuple[str, ...]]:
    p = f"{LM}.layers.{layer}.mlp.experts.{expert}"
    return {"linear_fc1": (f"{p}.gate_proj.weight", f"{p}.up_proj.weight"), "linear_fc2": (f"{p}.down_proj.weight",)}


def router_hf_name(layer: int) -> str:
    return f"{LM}.layers.{layer}.mlp.gate.weight"


def dense_mlp_hf_names(layer: int) -> dict[str, tuple[str, ...]]:
    p = f"{LM}.layers.{layer}.mlp"
    return {"linear_fc1": (f"{p}.gate_proj.weight", f"{p}.up_proj.weight"), "linear_fc2": (f"{p}.down_proj.weight",)}


def discriminator_maps(hf_config, spec: DiscriminatorSpec) -> list[ParamMap]:
    """Every parameter of a discriminator of this backbone config and spec, in a fixed order."""
    base = [m for m in all_maps(hf_config, list(expected_vision_shapes(hf_config)))
            if m.megatron != "language_model.output_layer.weight"]
    maps: list[ParamMap] = []
    for m in base:
        if not (spec.is_moe and _is_dense_mlp(m)):
            maps.append(m)
            continue
        i = m.layer
        prefix = f"language_model.decoder.layers.{i}.mlp"
        which = "linear_fc1" if m.megatron.endswith("linear_fc1.weight") else "linear_fc2"
        if which == "linear_fc1":  # the router once per layer, next to the first expert tensor
            maps.append(ParamMap(f"{prefix}.router.weight", (router_hf_name(i),), "replicated", i))
        for e in range(spec.experts):
            maps.append(ParamMap(f"{prefix}.experts.local_experts.{e}.{which}.weight",
                                 expert_hf_names(i, e)[which], m.split, i))
    maps.append(ParamMap(HEAD, (HEAD,), "replicated", place="last"))
    return maps


def expert_index(megatron_name: str) -> int | None:
    """The (global or local) expert index in a parameter name, None for non-expert parameters."""
    match = _EXPERT.search(megatron_name)
    return int(match.group(2)) if match else None


def local_expert_name(global_name: str, num_experts: int, ep: int, ep_rank: int) -> str | None:
    """Global expert name -> the name on ``ep_rank`` (None when another EP rank holds it)."""
    e = expert_index(global_name)
    if e is None:
        return global_name
    per = num_experts // ep
    if e // per != ep_rank:
        return None
    return _EXPERT.sub(lambda mt: f"{mt.group(1)}{e % per}{mt.group(3)}", global_name, count=1)


def global_expert_name(local_name: str, num_experts: int, ep: int, ep_rank: int) -> str:
    e = expert_index(local_name)
    if e is None:
        return local_name
    per = num_experts // ep
    return _EXPERT.sub(lambda mt: f"{mt.group(1)}{ep_rank * per + e}{mt.group(3)}", local_name, count=1)
