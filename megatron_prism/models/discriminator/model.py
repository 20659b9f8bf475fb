"""``Qwen3VLDiscriminator``: the Qwen3-VL backbone (MoE or dense MLPs) with a scalar score head.

It is the policy model (:class:`Qwen3VLPolicy`: vision tower, DeepStack, interleaved 3-D MRoPE,
TP/PP/SP) built from the discriminator layer spec, without an output layer, plus:

* ``score_head``: dropout (PRISM: 0.1) then a bias-free linear ``h -> 1`` (init N(0, 0.02)),
  replicated over TP ranks, on the last pipeline stage;
* ``forward(..., part_labels=, score_positions=)``: tells every router the tokens' parts, runs the
  backbone, and on the last stage returns ``[b, 2]`` scores read from the final-normed hidden
  state at each row's two score positions (caption, reasoning). Other stages return hidden states
  for the next stage, as the policy does, so megatron's pipeline schedules drive it unchanged.

Under sequence parallelism the last stage gathers the hidden states with a *split* backward (each
TP rank computes the same replicated head, so each must keep only its slice of the gradient), not
the reduce-scatter the policy's ``return_hidden`` uses for tensor-parallel consumers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import tensor_parallel

from megatron_prism.models.discriminator.mapping import global_expert_name
from megatron_prism.models.discriminator.router import NUM_PARTS, PartAwareRouter
from megatron_prism.models.discriminator.spec import DiscriminatorSpec, discriminator_layer_spec
from megatron_prism.models.qwen3vl.model import Qwen3VLPolicy


class Qwen3VLDiscriminator(Qwen3VLPolicy):
    """The discriminator model chunk of one pipeline stage."""

    def __init__(self, config, hf_config, spec: DiscriminatorSpec, *, head_dropout: float = 0.1,
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None) -> None:
        super().__init__(config, hf_config, pre_process=pre_process, post_process=post_process,
                         vp_stage=vp_stage, backend="local", layer_spec=discriminator_layer_spec(spec), lm_head=False)
        self.spec = spec
        self.vp_stage = vp_stage or 0
        self.hf_files_dir = None  # set by build_discriminator (copied into saved checkpoints)
        if post_process:
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            self.score_dropout = torch.nn.Dropout(head_dropout)
            self.score_head = torch.nn.Linear(config.hidden_size, 1, bias=False, device=device,
                                              dtype=config.params_dtype)
        if spec.mode == "dedicated":
            for router in self.routers():
                router.set_dedicated_groups(spec.perception_group_size)

    def routers(self) -> list[PartAwareRouter]:
        return [m for m in self.modules() if isinstance(m, PartAwareRouter)]

    def global_named_parameters(self, vp_stage: int = 0) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Parameters under the checkpoint's global names (whole-model layer and expert indices)."""
        from megatron.core import parallel_state as ps

        from megatron_prism.models.conversion.mapping import global_name

        cfg = self.config
        pp, vpp = cfg.pipeline_model_parallel_size, cfg.virtual_pipeline_model_parallel_size
        pp_rank = ps.get_pipeline_model_parallel_rank()
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        for name, param in self.named_parameters():
            gname = global_name(name, pp_rank, vp_stage, cfg.num_layers, pp, vpp)
            if self.spec.is_moe:
                gname = global_expert_name(gname, self.spec.experts, ep, ep_rank)
            yield gname, param

    # --- MoE bookkeeping -------------------------------------------------------------------

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient scale of the aux loss per micro-batch (see :mod:`.router`): 1 / (M * D)."""
        for router in self.routers():
            router.aux_loss_scale = float(scale)

    def moe_stats(self, reset: bool = True) -> dict[str, torch.Tensor]:
        """This stage's routing since the last reset: ``load`` [layers, parts, E] token counts
        (parts: prompt, caption, reasoning; padding excluded; summed over the TP group, whose
        ranks see different sequence slices under SP) and ``lb_loss`` [layers] mean switch
        load-balancing loss (1.0 = balanced), summed over TP ranks likewise."""
        routers = self.routers()
        if not routers:
            return {"load": torch.zeros(0, NUM_PARTS, 0), "lb_loss": torch.zeros(0)}
        load = torch.stack([r.load.clone() for r in routers])
        lb = torch.tensor([r.lb_loss_sum / max(r.lb_loss_count, 1) for r in routers], dtype=torch.float64)
        if self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1:
            from megatron.core import parallel_state as ps
            import torch.distributed as dist

            from megatron_prism.parallel.devices import to_comm_device

            group = ps.get_tensor_model_parallel_group()
            packed = to_comm_device(torch.cat([load.flatten(), lb.to(load.device)]), group)
            dist.all_reduce(packed, group=group)
            packed = packed.to(load.device)
            load, lb = packed[: load.numel()].view_as(load), packed[load.numel():]
        if reset:
            for r in routers:
                r.reset_stats()
        return {"load": load, "lb_loss": lb}

    def _set_token_labels(self, part_labels: torch.Tensor | None) -> None:
        routers = self.routers()
        if not routers:
            return
        local = None
        if part_labels is not None:
            # [b, s] -> the router's token order: [s_local, b] flattened (s-major).
            labels = part_labels.transpose(0, 1).contiguous()
            local = self._local_sequence(labels).reshape(-1)
        for r in routers:
            r.token_labels = local

    # --- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                position_ids=None, part_labels: torch.Tensor | None = None,
                score_positions: torch.Tensor | None = None, **kwargs):
        """Scores ``[b, 2]`` (caption, reasoning) on the last stage when ``score_positions`` [b, 2]
        is given (final-normed hidden ``[b, s, h]`` otherwise); hidden states for the next stage
        elsewhere. ``part_labels`` [b, s] (router.PAD/PROMPT/CAPTION/REASONING) feed the routers."""
        if self.spec.mode == "dedicated" and part_labels is None:
            raise ValueError("the dedicated discriminator routes by part: pass part_labels (ScoreBatch.part_labels)")
        self._set_token_labels(part_labels)
        want = "local" if self.post_process else False
        out = super().forward(input_ids, pixel_values, image_grid_thw, attention_mask,
                              position_ids=position_ids, return_hidden=want, **kwargs)
        if not self.post_process:
            return out
        hidden = out  # [s(/tp), b, h]
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        hidden = hidden.transpose(0, 1)  # [b, s, h]
        if score_positions is None:
            return hidden.contiguous()
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        picked = hidden[rows, score_positions.to(hidden.device)]  # [b, 2, h]
        return self.score_head(self.score_dropout(picked)).squeeze(-1).float()
