"""``build_policy``: a Qwen3-VL directory in, this rank's megatron model (with weights) out."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_prism.models.conversion.convert import layout_maps, open_source
from megatron_prism.models.conversion.mapping import canonical_name, place
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.config import LayoutOptions, check_layout, transformer_config
from megatron_prism.models.qwen3vl.model import Qwen3VLPolicy
from megatron_prism.models.qwen3vl.spec import resolve_attention_backend
from megatron_prism.parallel.devices import compute_device
from megatron_prism.parallel.state import current_layout, init_parallel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_policy(
    hf_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    *,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    dtype: torch.dtype | str = torch.float32,
    recompute: str = "none",
    backend: str = "auto",
    parallel_output: bool = True,
    seed: int = 1234,
) -> Qwen3VLPolicy | list[Qwen3VLPolicy]:
    """Build the Qwen3-VL policy for this process and load its weights.

    ``hf_dir`` is a Hugging Face Qwen3-VL directory (config.json + safetensors) or a
    megatron_prism checkpoint (any TP/PP: it is resharded on load). Sets up a one-process gloo
    group and megatron's parallel state when none exists; inside torchrun it uses the launched
    ranks. Returns this rank's pipeline stage, or the list of its model chunks when ``vpp`` is
    set (megatron's interleaved schedule takes the list).

    ``backend`` is ``model.attention_backend`` (auto | sdpa | te | flash | fused | unfused, see
    ``spec.resolve_attention_backend``): it picks the layer spec and megatron's attention backend.
    Weights load the same way under either spec (the map translates the two fused-norm names).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    choice = resolve_attention_backend(backend)
    hf_config, source, _ = open_source(hf_dir)
    check_layout(hf_config, tp, pp, vpp)
    # The policy has no experts, so the expert-parallel size is not its to choose: keep the one
    # the job set up (a discriminator with EP > 1 shares these process groups in one process).
    from megatron.core import parallel_state as ps

    ep = current_layout().ep if ps.model_parallel_is_initialized() else 1
    layout = init_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep, seed=seed)
    options = LayoutOptions(
        tp=tp, pp=pp, vpp=vpp, sequence_parallel=sequence_parallel, dtype=dtype,
        recompute=recompute, backend=choice.layer_spec, attention=choice.resolved,
    )
    config = transformer_config(hf_config, options)
    chunks = vpp or 1
    models = []
    for vp_stage in range(chunks):
        first = layout.pp_rank == 0 and vp_stage == 0
        last = layout.pp_rank == pp - 1 and vp_stage == chunks - 1
        models.append(
            Qwen3VLPolicy(
                config, hf_config, pre_process=first, post_process=last,
                vp_stage=vp_stage if vpp else None, backend=options.backend,
                parallel_output=parallel_output,
            )
        )
    # megatron allocates most weights on the current device, but not all (e.g. MoE router weights
    # are created on the host and left for the trainer to move, as megatron's get_model does)
    device = compute_device()
    for m in models:
        m.to(device)
    _load_weights(models, hf_config, source, layout.tp_rank, tp, pp, vpp, hf_dir)
    return models if vpp else models[0]


def _load_weights(models, hf_config, source, tp_rank, tp, pp, vpp, origin) -> None:
    """Fill every parameter of this rank's chunks from ``source``; refuse anything partial."""
    from megatron.core import parallel_state as ps

    pp_rank = ps.get_pipeline_model_parallel_rank()
    num_layers = hf_config.text_config.num_hidden_layers
    wanted: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for m in layout_maps(hf_config, pp):
        where = place(m, num_layers, pp, vpp)
        if where.pp_rank == pp_rank:
            wanted[where.vp_stage][where.local_name] = source.shard(m, tp_rank, tp)
    load_by_map_names(models, wanted, origin, "conversion map")


def load_by_map_names(models, wanted: list[dict[str, torch.Tensor]], origin, what: str) -> None:
    """Load ``wanted[i]`` (chunk-local names of the map) into chunk ``i``, whatever layer spec built it:
    the chunk's own names are translated to the map's (``canonical_name``); refuse anything partial
    or misshapen. ``_extra_state`` entries (TE's FP8 metadata) are not weights and are left alone."""
    for chunk, state in zip(models, wanted):
        current = chunk.state_dict()
        names = {canonical_name(k): k for k in current if not k.endswith("_extra_state")}
        own = {k: current[v] for k, v in names.items()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{origin}: weights do not fit the built model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); this is a bug in the {what}"
            )
        for name, tensor in state.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{origin}: {name} has shape {list(tensor.shape)}, the model expects "
                    f"{list(own[name].shape)}; the checkpoint does not match this config"
                )
        chunk.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)
