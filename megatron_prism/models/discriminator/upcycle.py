"""Upcycling a dense Qwen3-VL backbone into the discriminator's weights (sparse upcycling).

Every expert of layer i starts as an exact copy of layer i's dense SwiGLU MLP (gate, up, down), the
router starts N(0, 0.02) as megatron's ``init_method`` (and PRISM) would, and the score head
N(0, 0.02). With exact copies and the top-k weights summing to one (softmax over the top-k), the
MoE layer computes the dense MLP whatever the router does, so the upcycled model *is* the dense
model at init (tested).

megatron-core ships ``upcycling_utils.upcycle_state_dict(moe_model, dense_model)``; at granularity 1
and without pre-softmax routing it does the same arithmetic (copy fc1/fc2 into every local expert,
keep the MoE model's router init). We do not call it because it works on two in-memory models of
one parallel layout, whereas our checkpoints are resharded by name on load: upcycling here is a
name map (each expert's "HF" tensors are the dense MLP's), so the same code serves the tool, any
TP/PP/EP layout, and a direct in-memory upcycle.

Initialised tensors are drawn from a generator seeded by (seed, tensor name), so every rank of a
parallel job draws the same replicated router/head values without communicating.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from megatron_prism.models.conversion.mapping import ParamMap
from megatron_prism.models.discriminator.manifest import is_discriminator_checkpoint
from megatron_prism.models.discriminator.mapping import HEAD, dense_mlp_hf_names
from megatron_prism.models.discriminator.spec import DiscriminatorSpec
from megatron_prism.models.errors import CheckpointError

INIT_STD = 0.02
_EXPERT_PART = {"gate_proj": 0, "up_proj": 1, "down_proj": 0}


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def init_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.02), reproducible from (seed, name) alone."""
    return (torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32) * INIT_STD).to(dtype)


class UpcycleSource:
    """Discriminator weights computed from a dense backbone source (``open_source``'s second value)."""

    def __init__(self, backbone, hf_config, spec: DiscriminatorSpec, *, seed: int = 0,
                 expert_noise: float = 0.0, dtype: torch.dtype | None = None) -> None:
        self.backbone = backbone
        self.spec = spec
        self.seed = seed
        self.expert_noise = expert_noise
        self.hidden = hf_config.text_config.hidden_size
        probe = self._dense(dense_mlp_hf_names(0)["linear_fc2"][0])
        self.dtype = dtype or probe.dtype

    def _dense(self, name: str) -> torch.Tensor:
        if hasattr(self.backbone, "weights"):  # HFSource
            return self.backbone.weights.get(name)
        return self.backbone.hf_tensor(name)  # MegatronWeights of a policy checkpoint

    def get(self, name: str) -> torch.Tensor:
        parts = name.split(".")
        if name == HEAD:
            return init_tensor(self.seed, name, (1, self.hidden), self.dtype)
        if parts[-2] == "gate" and parts[-3] == "mlp":  # ...layers.{i}.mlp.gate.weight: the router
            return init_tensor(self.seed, name, (self.spec.experts, self.hidden), self.dtype)
        if "experts" in parts:  # ...layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
            layer = int(parts[parts.index("layers") + 1])
            which = "linear_fc2" if parts[-2] == "down_proj" else "linear_fc1"
            dense = self._dense(dense_mlp_hf_names(layer)[which][_EXPERT_PART[parts[-2]]])
            if self.expert_noise:
                noise = torch.randn(dense.shape, generator=_generator(self.seed, name)) * self.expert_noise
                dense = (dense.float() + noise).to(dense.dtype)
            return dense
        return self._dense(name)

    def shard(self, m: ParamMap, tp_rank: int, tp_size: int) -> torch.Tensor:
        return m.shard([self.get(n) for n in m.hf], tp_rank, tp_size)


def backbone_source(path: str | Path):
    """(hf_config, dense source, hf-files dir) of a plain Qwen3-VL backbone; refuses a discriminator."""
    from megatron_prism.models.conversion.convert import open_source

    if is_discriminator_checkpoint(path):
        raise CheckpointError(f"{path}: already a discriminator checkpoint; upcycle a plain Qwen3-VL backbone "
                              "(a Hugging Face directory or a policy checkpoint)")
    return open_source(path)
