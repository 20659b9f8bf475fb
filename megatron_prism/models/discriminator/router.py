"""``PartAwareRouter``: megatron's TopKRouter that knows which part of the response a token is in.

The discriminator model tells every router, before each forward, the part label of each token
(:data:`PROMPT`, :data:`CAPTION`, :data:`REASONING`, or :data:`PAD`) in the router's own token
order (``[s_local, b]`` flattened, s-major, the rank's sequence slice under sequence
parallelism). The router uses the labels for two things:

* ``dedicated`` mode: logits of the experts outside the token's group are set to -inf before
  top-k, so caption tokens are served by the perception group and think+answer tokens by the
  reasoning group (prompt and padding tokens may use any expert). Everything downstream (top-k
  softmax, dispatch, aux loss) is megatron's.
* load statistics: tokens per (part, expert), padding excluded, for logging.

The aux loss: megatron computes the switch load-balancing loss and attaches its gradient to the
router probabilities (``MoEAuxLossAutoScaler``), which is what makes it work across pipeline
stages. With ``calculate_per_token_loss`` (the project's convention, see the policy config)
megatron multiplies it by the micro-batch's token count, expecting finalize_model_grads to divide
by the global token count, which this project does not do (its losses arrive normalised). We attach
``aux_loss * aux_loss_scale`` instead: per micro-batch the gradient is that of
``coeff * lb_loss * aux_loss_scale``; a trainer that sums gradients over M micro-batches and D
data-parallel ranks sets ``aux_loss_scale = 1 / (M * D)`` to get the mean over the global batch.

Known limit: the labels are a side channel set per forward, so activation recomputation in a
pipeline schedule could replay a layer with another micro-batch's labels; ``build_discriminator``
refuses recomputation in dedicated mode.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

PAD, PROMPT, CAPTION, REASONING = -1, 0, 1, 2
NUM_PARTS = 3  # prompt (and anything outside the two parts), caption, reasoning


class PartAwareRouter(TopKRouter):
    """TopKRouter + per-token part labels (expert-group masking, load statistics)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.token_labels: torch.Tensor | None = None  # [tokens] int, set by the model per forward
        self.group_mask: torch.Tensor | None = None  # [NUM_PARTS, E] bool allowed experts, or None
        self.aux_loss_scale = 1.0
        e = self.config.num_moe_experts
        # Statistics: plain attributes, not buffers, so they never enter state dicts.
        self.load = torch.zeros(NUM_PARTS, e, dtype=torch.float64)
        self.lb_loss_sum = 0.0
        self.lb_loss_count = 0

    def set_dedicated_groups(self, perception_experts: int) -> None:
        e = self.config.num_moe_experts
        mask = torch.ones(NUM_PARTS, e, dtype=torch.bool)
        mask[CAPTION, perception_experts:] = False
        mask[REASONING, :perception_experts] = False
        self.group_mask = mask

    def apply_input_jitter(self, input: torch.Tensor) -> torch.Tensor:
        # megatron jitters in eval too; scores used as rewards must not depend on a random draw.
        return super().apply_input_jitter(input) if self.training else input

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if self.group_mask is None:
            return logits
        labels = self._labels(logits.shape[0] * logits.shape[1] if logits.dim() == 3 else logits.shape[0])
        allowed = self.group_mask.to(logits.device)[labels.clamp(min=PROMPT)]  # [tokens, E]
        return logits.masked_fill(~allowed.view(logits.shape), float("-inf"))

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        probs, routing_map = super().routing(logits, *args, **kwargs)
        if self.token_labels is not None:
            with torch.no_grad():
                labels = self._labels(routing_map.shape[0])
                counted = routing_map[labels >= 0].to(torch.float64)
                part = labels[labels >= 0]
                self.load.index_add_(0, part.cpu(), counted.cpu())
        return probs, routing_map

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, *args, **kwargs):
        """Record the loss and attach its gradient at the project's scale (module docstring)."""
        self.lb_loss_sum += float(aux_loss.detach() / aux_loss_coeff)
        self.lb_loss_count += 1
        return MoEAuxLossAutoScaler.apply(activation, aux_loss * self.aux_loss_scale)

    def _labels(self, num_tokens: int) -> torch.Tensor:
        if self.token_labels is None:
            raise RuntimeError("dedicated routing needs per-token part labels: call the discriminator "
                               "model with part_labels (see ScoreBatch)")
        if self.token_labels.numel() != num_tokens:
            raise RuntimeError(f"router got {num_tokens} tokens but {self.token_labels.numel()} part labels")
        return self.token_labels

    def reset_stats(self) -> None:
        self.load.zero_()
        self.lb_loss_sum = 0.0
        self.lb_loss_count = 0
