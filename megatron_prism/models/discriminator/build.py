"""``build_discriminator``: a discriminator checkpoint in, this rank's model chunk(s) with weights out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_prism.models.discriminator.checkpoint import open_discriminator
from megatron_prism.models.discriminator.mapping import discriminator_maps, local_expert_name
from megatron_prism.models.discriminator.model import Qwen3VLDiscriminator
from megatron_prism.models.discriminator.spec import MOE_MODES, DiscriminatorSpec, moe_config_fields
from megatron_prism.models.discriminator.upcycle import UpcycleSource, backbone_source
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.build import load_by_map_names
from megatron_prism.models.qwen3vl.config import LayoutOptions, check_layout, transformer_config
from megatron_prism.parallel.devices import compute_device
from megatron_prism.parallel.state import init_parallel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_discriminator(
    source: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    mode: str | None = None,
    sequence_parallel: bool = False,
    dtype: torch.dtype | str = torch.float32,
    recompute: str = "none",
    head_dropout: float = 0.1,
    router_jitter: float | None = None,
    seed: int = 1234,
    upcycle: DiscriminatorSpec | None = None,
) -> Qwen3VLDiscriminator | list[Qwen3VLDiscriminator]:
    """Build the discriminator for this process and load its weights.

    ``source`` is a discriminator checkpoint (``tools/upcycle_discriminator.py`` or
    :func:`save_discriminator`); anything else is a :class:`CheckpointError`, so a wrong path never
    yields a random head. ``upcycle=DiscriminatorSpec(...)`` instead upcycles a plain backbone (HF
    directory or policy checkpoint) in memory: router and head are freshly initialised, on purpose.

    ``mode``: None takes the checkpoint's; ``routed``, ``dedicated`` and ``text-only`` share one
    weight layout, so an MoE checkpoint may be run in any of them (``dense`` needs a dense one).
    ``router_jitter`` overrides the stored router noise (0 turns it off, e.g. for evaluation).
    TP > 1 with MoE needs ``sequence_parallel`` (megatron refuses MoE + TP without it in training).
    Returns this rank's pipeline stage, or its list of model chunks when ``vpp`` is set.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if upcycle is None:
        hf_config, spec, weights, hf_dir, meta = open_discriminator(source)
    else:
        hf_config, dense, hf_dir = backbone_source(source)
        spec, meta = upcycle, {"initialised": "score head and routers (in-memory upcycle)"}
        weights = UpcycleSource(dense, hf_config, spec, seed=seed)
    spec = _resolve_mode(spec, mode, source)
    if router_jitter is not None:
        spec = dataclasses.replace(spec, router_jitter=router_jitter)
    if spec.is_moe and spec.experts % ep:
        raise ValueError(f"expert-parallel size {ep} does not divide {spec.experts} experts")
    if spec.is_moe and tp > 1 and not sequence_parallel:
        raise ValueError("an MoE discriminator at TP > 1 needs sequence_parallel=True (megatron's MoE requires it)")
    if spec.mode == "dedicated" and recompute != "none":
        raise ValueError("dedicated routing passes part labels outside megatron's recompute checkpoints; use recompute='none'")
    check_layout(hf_config, tp, pp, vpp)
    layout = init_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep, seed=seed)
    options = LayoutOptions(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sequence_parallel, dtype=dtype,
                            recompute=recompute, backend="local")
    config = transformer_config(hf_config, options)
    config = dataclasses.replace(config, **moe_config_fields(spec, hf_config.text_config.intermediate_size, ep,
                                                          hf_config.text_config.num_hidden_layers))
    chunks = vpp or 1
    models = []
    for vp_stage in range(chunks):
        model = Qwen3VLDiscriminator(
            config, hf_config, spec, head_dropout=head_dropout,
            pre_process=layout.pp_rank == 0 and vp_stage == 0,
            post_process=layout.pp_rank == pp - 1 and vp_stage == chunks - 1,
            vp_stage=vp_stage if vpp else None,
        )
        model.hf_files_dir = hf_dir
        model.provenance = meta
        models.append(model)
    device = compute_device()  # the MoE router weights are created on the host (see build_policy)
    for m in models:
        m.to(device)
    _load(models, hf_config, spec, weights, tp, pp, vpp, source)
    return models if vpp else models[0]


def _resolve_mode(spec: DiscriminatorSpec, mode: str | None, source) -> DiscriminatorSpec:
    if mode is None or mode == spec.mode:
        return spec
    if spec.mode in MOE_MODES and mode in MOE_MODES:
        return spec.with_mode(mode)  # validates the dedicated split
    raise CheckpointError(f"{source}: a {spec.mode!r} discriminator cannot run as {mode!r} (different weights); "
                          f"upcycle the backbone again with --mode {mode}")


def _load(models, hf_config, spec, weights, tp, pp, vpp, origin) -> None:
    """Fill every parameter of this rank's chunks; refuse anything partial or misshapen."""
    from megatron.core import parallel_state as ps

    from megatron_prism.models.conversion.mapping import place

    pp_rank = ps.get_pipeline_model_parallel_rank()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    num_layers = hf_config.text_config.num_hidden_layers
    wanted: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for m in discriminator_maps(hf_config, spec):
        where = place(m, num_layers, pp, vpp)
        name = local_expert_name(where.local_name, spec.experts, ep, ep_rank) if spec.is_moe else where.local_name
        if where.pp_rank == pp_rank and name is not None:
            wanted[where.vp_stage][name] = weights.shard(m, tp_rank, tp)
    load_by_map_names(models, wanted, origin, "discriminator map")
