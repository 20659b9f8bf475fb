"""Qwen3-VL on megatron-core: vision tower -> merged embeddings -> GPTModel with MRoPE + DeepStack.

``Qwen3VLPolicy`` owns two submodules whose state-dict prefixes the conversion map relies on:

* ``vision`` (first pipeline stage only): :class:`Qwen3VLVisionTower`;
* ``language_model``: a megatron ``GPTModel`` built from the Qwen3 layer spec, whose rotary module
  is swapped for :class:`InterleavedMRoPE`.

Every pipeline stage computes the 3-D position ids itself (they only need ``input_ids`` and the
grids), so nothing but hidden states crosses stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_prism.models.common.token_logprobs import TokenLogProbs, token_logprobs
from megatron_prism.models.conversion.mapping import padded_vocab_size
from megatron_prism.models.qwen3vl.rope import InterleavedMRoPE, mrope_position_ids
from megatron_prism.models.qwen3vl.spec import final_norm_spec, qwen3vl_layer_spec
from megatron_prism.models.qwen3vl.vision import Qwen3VLVisionTower


@dataclass
class HeadRequest:
    """Ask the last stage for target-token log-probs instead of logits (the training head)."""

    targets: torch.Tensor  # [b, s] next-token ids; -100 marks positions without a target
    with_entropy: bool = False
    backend: str = "auto"


class Qwen3VLLanguageModel(GPTModel):
    """GPTModel with Qwen3-VL's interleaved MRoPE, able to stop before the output layer or to
    replace it by the fused log-prob head."""

    def __init__(self, config: TransformerConfig, *, rotary_base: float, real_vocab_size: int, **kwargs) -> None:
        """``vocab_size`` (megatron's) is the padded vocabulary; ``real_vocab_size`` the model's own:
        padded rows are left out of log-probs and entropy, and sliced off returned logits."""
        super().__init__(config=config, position_embedding_type="mrope", rotary_base=rotary_base, **kwargs)
        self.real_vocab_size = real_vocab_size
        # Swap megatron's Qwen2-VL (sectioned) MRoPE for the interleaved layout of Qwen3-VL.
        self.rotary_pos_emb = InterleavedMRoPE(config.kv_channels, rotary_base, config.mrope_section)
        self._emit_hidden = False
        self._head: HeadRequest | None = None

    def _set_attention_backend(self) -> None:
        """megatron (LanguageModule.__init__) exports TE's kernel switches (NVTE_FLASH_ATTN,
        NVTE_FUSED_ATTN, NVTE_UNFUSED_ATTN) from ``config.attention_backend`` and asserts that
        every model of the process agrees. The local spec's attention is SDPA, which reads none of
        them: it leaves them alone, so a local-spec model (the discriminator) can share a process
        with a TE-spec policy; the TE spec keeps megatron's behaviour."""
        from megatron.core.transformer.enums import AttnBackend

        if self.config.attention_backend != AttnBackend.local:
            super()._set_attention_backend()

    def forward(self, *args, return_hidden: bool | str = False, head: HeadRequest | None = None, **kwargs):
        self._emit_hidden = return_hidden
        self._head = head
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._emit_hidden = False
            self._head = None

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._head is not None and self.post_process:
            if self.share_embeddings_and_output_weights:
                weight = self.shared_embedding_or_output_weight()
            else:
                weight = self.output_layer.weight
            return token_logprobs(
                hidden_states, weight, self._head.targets, sequence_parallel=self.config.sequence_parallel,
                with_entropy=self._head.with_entropy, backend=self._head.backend,
                vocab_size=self.real_vocab_size if self.real_vocab_size < self.vocab_size else None,
            )
        if self._emit_hidden == "local" and self.post_process:
            # [s, b, h] as this rank holds it (its sequence slice under SP): for callers that
            # gather only what they need, with the gradient semantics they need.
            return hidden_states
        if self._emit_hidden and self.post_process:
            if self.config.sequence_parallel:
                hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=True
                )
            return hidden_states.transpose(0, 1).contiguous()  # [b, s, h], final-normed
        logits = super()._postprocess(hidden_states, *args, **kwargs)
        if self.post_process and self.real_vocab_size < self.vocab_size and logits.shape[-1] == self.vocab_size:
            logits = logits[..., : self.real_vocab_size]  # gathered logits: the padding is no token
        return logits


def padding_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """[b, s] 1/0 padding mask -> megatron boolean mask [b, 1, s, s] (True = masked), or None.

    A [b, 1, s, s] boolean mask is taken as already in megatron's convention (packed sequences
    pass their block-diagonal causal mask this way).

    None means "causal, no padding", which lets attention use its fused causal path. A padded
    query row still attends to itself so that no softmax row is empty (empty rows give NaN, and NaN
    values at padded keys would poison real rows through 0 * NaN).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (seq_len, seq_len):
            raise ValueError(f"a 4-D attention mask must be bool [b, 1, {seq_len}, {seq_len}] (True = masked), "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        return attention_mask
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep.device).tril()
    allowed = causal[None] & keep[:, None, :]
    allowed |= torch.eye(seq_len, dtype=torch.bool, device=keep.device)[None]
    return (~allowed).unsqueeze(1)


def thd_packed_seq_params(cu_seqlens: torch.Tensor, seq_len: int):
    """megatron's THD ``PackedSeqParams`` for one packed row of ``seq_len`` tokens whose samples
    end at ``cu_seqlens`` ([n + 1], from the packing; padding after the last sample excluded).

    Trailing padding becomes one more sequence of its own (it attends only to itself, as in the
    dense mask), so that ``cu_seqlens[-1]`` is the row length: megatron 0.16.1 then applies the
    rotary angles token by token (models/common/embeddings/rope_utils.py, _apply_rotary_pos_emb_thd
    "CASE 1: exact mapping with offsets"), which Qwen3-VL's per-sample 3-D MRoPE positions need;
    otherwise it would restart positions 0..n at every sample, ignoring the image rows."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > seq_len:
        raise ValueError(f"cu_seqlens must rise from 0 to at most the row length {seq_len}, got {cu.tolist()}")
    if int(cu[-1]) < seq_len:
        cu = torch.cat([cu, cu.new_tensor([seq_len])])
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row of a [b, s] 1/0 mask is ones then zeros."""
    keep = attention_mask.bool()
    return bool((keep[:, 1:] <= keep[:, :-1]).all())


def attention_inputs(packed_layout: str, attention_mask: torch.Tensor | None, input_shape: tuple[int, int],
                     cu_seqlens: torch.Tensor | None = None):
    """(megatron attention mask, PackedSeqParams) for a batch, by how the layer spec isolates samples.

    ``mask`` (local spec, SDPA): the dense boolean mask of :func:`padding_attention_mask`; a packed
    row's block-diagonal mask is used as given and ``cu_seqlens`` is not needed.

    ``thd`` (Transformer Engine spec): TE's fused attention takes no arbitrary dense mask (with the
    spec's causal mask type it ignores ``attention_mask``), so a packed row goes as THD with its
    ``cu_seqlens`` (megatron turns the causal mask type into padding_causal for THD) and no mask; a
    right-padded [b, s] batch needs no mask (causal attention never lets a real token see the
    padding after it); anything else would silently leak across samples and is refused.
    ``input_shape`` is ``input_ids``' [b, s]."""
    batch, seq_len = input_shape
    if packed_layout == "mask":
        return padding_attention_mask(attention_mask, seq_len), None
    if packed_layout != "thd":
        raise ValueError(f"packed_layout must be 'mask' or 'thd', got {packed_layout!r}")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"THD packing takes one packed row per micro-batch; got {batch} rows with cu_seqlens")
        return None, thd_packed_seq_params(cu_seqlens, seq_len)
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 4:
        raise ValueError("Transformer Engine attention ignores a dense [b, 1, s, s] mask: pass the packing's "
                         "cu_seqlens with it, or set model.attention_backend=sdpa")
    if not _right_padded(attention_mask):
        raise ValueError("Transformer Engine attention takes right-padded batches only (its causal mask cannot "
                         "hide left padding or holes); right-pad the batch or set model.attention_backend=sdpa")
    return None, None


class Qwen3VLPolicy(MegatronModule):
    """The Qwen3-VL policy (and reference) model on megatron-core."""

    def __init__(
        self,
        config: TransformerConfig,
        hf_config,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        backend: str = "local",
        parallel_output: bool = True,
        layer_spec=None,
        lm_head: bool = True,
    ) -> None:
        """``layer_spec`` replaces the decoder-layer spec (the discriminator's MoE layers);
        ``lm_head=False`` builds no output layer (a model that reads hidden states only), and so
        unties the embedding, which then lives on the first stage alone."""
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        tc = hf_config.text_config
        self.hf_config = hf_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = hf_config.image_token_id
        self.video_token_id = hf_config.video_token_id
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size
        # how samples packed into one row are kept apart (see attention_inputs)
        self.packed_layout = "thd" if backend == "te" else "mask"
        layer = layer_spec if layer_spec is not None else qwen3vl_layer_spec(backend)
        block = TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
            layer_norm=final_norm_spec(backend),
        )
        rope = dict(tc.rope_parameters)
        self.language_model = Qwen3VLLanguageModel(
            config,
            rotary_base=float(rope["rope_theta"]),
            transformer_layer_spec=block,
            vocab_size=padded_vocab_size(tc.vocab_size, config.tensor_model_parallel_size),
            real_vocab_size=tc.vocab_size,
            max_sequence_length=tc.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings) and lm_head,
            parallel_output=parallel_output,
            vp_stage=vp_stage,
        )
        if not lm_head and post_process:
            self.language_model.output_layer = None
        self.vision = Qwen3VLVisionTower(config, hf_config.vision_config) if pre_process else None

    # megatron's finalize_model_grads finds the outermost module with `pre_process` and asks it
    # for the tied embedding, to all-reduce its gradient between the first and last stage.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules with the previous stage's output."""
        self.language_model.set_input_tensor(input_tensor)

    def position_ids(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        """3-D MRoPE position ids [3, b, s], as Qwen3-VL computes them."""
        positions, _ = mrope_position_ids(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=self.spatial_merge_size,
        )
        return positions

    def _local_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, ...] -> this rank's slice of the sequence under sequence parallelism."""
        if self.config.sequence_parallel:
            return tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def _embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Token embeddings with vision features at the placeholders, and the DeepStack context."""
        word_embeddings = self.language_model.embedding.word_embeddings
        text = word_embeddings(input_ids)
        if not word_embeddings.reduce_scatter_embeddings:
            text = text.transpose(0, 1).contiguous()  # [s, b, h] (already so under SP)
        visual: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
        for pixels, grid, token in (
            (pixel_values, image_grid_thw, self.image_token_id),
            (pixel_values_videos, video_grid_thw, self.video_token_id),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError("pixel values were given without their grid_thw")
            features, deepstack = self.vision(pixels, grid)
            mask = input_ids == token  # [b, s]
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(mask.sum())} placeholder tokens (id {token}) in input_ids but the vision "
                    f"tower produced {features.shape[0]} features for grids {grid.tolist()}"
                )
            visual.append((mask, features, deepstack))
        if not visual:
            return text, None
        b, s = input_ids.shape
        h = self.config.hidden_size
        levels = len(visual[0][2])
        # Features fill their placeholders in batch-major order (sample 0's images first), as the
        # processor lays them out and as transformers' masked_scatter does.
        dense = text.new_zeros(b, s, h)
        context = text.new_zeros(b, s, levels, h) if levels else None
        any_mask = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
        for mask, features, deepstack in visual:
            dense = dense.index_put((mask,), features.to(dense.dtype))
            if context is not None:
                context = context.index_put((mask,), torch.stack(deepstack, dim=1).to(dense.dtype))
            any_mask |= mask
        any_mask = any_mask.transpose(0, 1).contiguous()[..., None]  # [s, b, 1]
        dense = dense.transpose(0, 1).contiguous()
        embeddings = torch.where(self._local_sequence(any_mask), self._local_sequence(dense), text)
        if context is not None:
            context = self._local_sequence(context.transpose(0, 1).contiguous())
        return embeddings, context

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool | str = False,
        gather_logits: bool = True,
        head: HeadRequest | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | TokenLogProbs:
        """Logits [b, s, vocab] on the last stage (hidden [b, s, h] with ``return_hidden``, or
        ``[s(/tp), b, h]`` as this rank holds it with ``return_hidden="local"``;
        :class:`TokenLogProbs` of ``head.targets`` with ``head``, the training path, which never
        builds the logits); on other pipeline stages, the hidden states [s, b, h] for the next.
        ``cu_seqlens`` ([n + 1]) are a packed row's sample boundaries: the TE spec attends in THD
        with them, the local spec uses the row's dense mask instead (:func:`attention_inputs`)."""
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(
                f"sequence parallelism splits the sequence over {tp} ranks: pad the sequence length "
                f"({input_ids.shape[1]}) to a multiple of {tp}"
            )
        if position_ids is None:
            if cu_seqlens is not None or (attention_mask is not None and attention_mask.dim() == 4):
                raise ValueError("with a packed row (a 4-D attention mask or cu_seqlens), pass the per-sample "
                                 "position_ids too")
            position_ids = self.position_ids(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        mask, packed = attention_inputs(self.packed_layout, attention_mask, tuple(input_ids.shape), cu_seqlens)
        decoder_input = None
        extra = None
        if self.pre_process:
            decoder_input, context = self._embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            if context is not None:
                extra = {"context": context}
        return self.language_model(
            input_ids,
            position_ids,
            mask,
            decoder_input=decoder_input,
            extra_block_kwargs=extra,
            runtime_gather_output=gather_logits,
            return_hidden=return_hidden,
            head=head,
            packed_seq_params=packed,
        )
