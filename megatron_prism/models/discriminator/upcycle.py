"""Upcycling a dense Qwen3-VL backbone into the discriminator's weights (sparse upcycling).

Every expert of layer i starts as a copy of layer i's dense SwiGLU MLP (gate, up, down) plus
Gaussian noise of std ``expert_noise``, drawn once per expert and tensor; the router starts
N(0, 0.02) and the score head N(0, 0.02). That is PRISM's upcycling (``moe/create_vl_moe.py``
``upcycle_qwen3_vl_to_moe``: ``param[expert_idx].copy_(dense)`` then
``param[expert_idx].add_(torch.randn_like(...) * noise_std)`` for ``gate_up_proj`` and ``down_proj``,
``nn.init.normal_(router, 0, 0.02)``; ``scripts/train/moe_warmup/create_moe.sh`` ``NOISE_STD=0.01``);
the noise breaks the symmetry between experts, and the router itself adds none. A dense
discriminator (``mode: dense``) gets the same noise on its one MLP, so dense and MoE arms start
from the same perturbation of the backbone. With ``expert_noise=0`` the copies are exact, and with
the top-k weights summing to one (softmax over the top-k) the MoE layer computes the dense MLP
whatever the router does: the upcycled model *is* the dense model at init (tested).

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


def _is_dense_lm_mlp(name: str) -> bool:
    """A language-model layer's dense MLP weight (the vision tower's MLPs are not upcycled)."""
    return name.startswith("model.language_model.layers.") and name.endswith(
        (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight"))


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
            return self._noisy(dense, name)
        if not self.spec.is_moe and _is_dense_lm_mlp(name):  # dense mode: the one MLP, noised alike
            return self._noisy(self._dense(name), name)
        return self._dense(name)

    def _noisy(self, dense: torch.Tensor, name: str) -> torch.Tensor:
        if not self.expert_noise:
            return dense
        noise = torch.randn(dense.shape, generator=_generator(self.seed, name)) * self.expert_noise
        return (dense.float() + noise).to(dense.dtype)

    def shard(self, m: ParamMap, tp_rank: int, tp_size: int) -> torch.Tensor:
        return m.shard([self.get(n) for n in m.hf], tp_rank, tp_size)


def backbone_source(path: str | Path):
    """(hf_config, dense source, hf-files dir) of a plain Qwen3-VL backbone; refuses a discriminator."""
    from megatron_prism.models.conversion.convert import open_source

    if is_discriminator_checkpoint(path):
        raise CheckpointError(f"{path}: already a discriminator checkpoint; upcycle a plain Qwen3-VL backbone "
                              "(a Hugging Face directory or a policy checkpoint)")
    return open_source(path)
