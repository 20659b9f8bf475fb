"""The embedded rollout engine: in-process batched generation for Qwen3-VL on CPU or one GPU.

Why: it is the engine that runs anywhere (tests, CPU-only machines, single-GPU debugging) with
no server, and it reads exactly the HF-named tensors the trainer streams to SGLang / vLLM.

How a ``generate`` call runs (per chunk of at most ``max_batch_rows`` sample rows):

1. the chunk's images are encoded in ONE call of transformers' ``Qwen3VLVisionModel`` (on CPU in
   float32: of :class:`.vision.VisionTower`, the same maths on that module's parameters; shared
   by the ``n`` samples of each request, never repeated per decode step);
2. the prompts are left-padded and prefilled ONCE per request; their keys/values are written to
   the ``n`` sample rows of a preallocated KV cache, and the ``n`` first tokens are drawn from the
   shared last-position logits;
3. batched one-token decode steps follow. A row that samples a stop id or reaches
   ``max_new_tokens`` leaves the batch: the cache, masks and positions are compacted so later
   steps compute only live rows. Text positions continue MRoPE as HF does: response token ``j``
   sits at ``max prompt position + 1 + j`` on all three axes (``len(prompt) + delta + j``).

Responses include the stop token that ended them (with its log-prob), finish reason ``stop``;
otherwise ``length``. Log-probs and seeding: see :mod:`.sampling`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from megatron_prism.models.qwen3vl.rope import mrope_position_ids
from megatron_prism.rollout.embedded.decoder import Decoder
from megatron_prism.rollout.embedded.sampling import Sampler, request_keys, row_keys
from megatron_prism.rollout.embedded.vision import VisionTower
from megatron_prism.rollout.embedded.weights import Qwen3VLWeights, load_hf_config, read_hf_tensors
from megatron_prism.rollout.interface import (
    MEMORY_TAGS,
    GenerationRequest,
    GenerationResult,
    MemoryTag,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    check_memory_tags,
    register_engine,
)


@register_engine("embedded")
class EmbeddedEngine(RolloutEngine):
    """Batched Qwen3-VL generation with our own text decoder and HF's vision tower (its module
    holds the weights; on CPU in float32 :class:`.vision.VisionTower` computes it).

    ``model``: a HF directory (config + safetensors), a mapping of HF-named tensors, or None for
    an engine whose weights all come with the first ``update_weights`` (``launch``); with a
    mapping or None, ``config`` -- a ``Qwen3VLConfig`` or a directory holding one -- is required. ``dtype``
    defaults to the config's ``dtype`` on GPU and float32 on CPU. ``max_batch_rows`` bounds the
    sample rows (requests x n) decoded together, hence the KV cache size.
    """

    def __init__(self, model: str | Path | Mapping[str, Tensor] | None, config=None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, max_batch_rows: int = 256, num_threads: int | None = None) -> None:
        if config is None:
            if model is None or isinstance(model, Mapping):
                raise ValueError("a config is required when the weights are given as a dict or not at all")
            config = load_hf_config(model)
        elif isinstance(config, (str, Path)):
            config = load_hf_config(config)
        self.config = config
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else (getattr(config.text_config, "dtype", None)
                                                                    or torch.bfloat16)
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        self.dtype = dtype
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.max_batch_rows = max_batch_rows
        if num_threads:
            torch.set_num_threads(num_threads)
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.merge = config.vision_config.spatial_merge_size
        self.vocab = config.text_config.vocab_size
        self.weights = Qwen3VLWeights(config, self.device, dtype)
        self.decoder = Decoder(config, self.weights, self.device)
        # CPU float32: our vision path on the HF module's parameters (fewer kernels, all images'
        # attention in one call); elsewhere the HF module itself
        self._vision = VisionTower(self.weights.visual) if self.decoder.cpu_decode else None
        if model is not None:
            self.weights.load(read_hf_tensors(model) if not isinstance(model, Mapping) else model)
        if model is not None and self.weights.missing:
            raise KeyError(f"the checkpoint lacks {len(self.weights.missing)} weights, e.g. "
                           f"{sorted(self.weights.missing)[:5]}")
        self._version: int | None = None
        self._cache: Tensor | None = None
        self._kv_released = False

    @classmethod
    def launch(cls, config_dir: Path, placement, device: torch.device) -> EmbeddedEngine:
        """An engine on ``device`` (the rank's own GPU, or the CPU) whose weights all come with the
        first sync; ``placement``'s memory fraction and ports do not apply to it."""
        return cls(None, config=config_dir, device=device)

    def resident_bytes(self) -> int:
        """Bytes the engine holds now: its weights' storages and its KV cache."""
        weights = sum(storage.nbytes() for storage, _ in self.weights._storages)
        cache = self._cache.untyped_storage().nbytes() if self._cache is not None else 0
        return weights + cache

    # --- interface: weights and memory ---------------------------------------------------------
    @property
    def weight_version(self) -> int | None:
        return self._version

    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> None:
        """Copy each bucket of (HF name, tensor) into the engine in place (dtype/device converted).

        Unknown names and shape mismatches raise before the offending bucket is written. The
        version is recorded once no weight is missing (after a release every weight must be sent;
        a live engine may receive only the weights that changed, e.g. not a frozen vision tower).
        """
        for bucket in buckets:
            self.weights.load(bucket)
        if not self.weights.missing:
            self._version = version

    def release_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        """``kv_cache``: drop the cache buffer. ``weights``: free every weight's storage; a
        ``resume_memory(['weights'])`` and a full ``update_weights`` must precede the next generate."""
        check_memory_tags(tags)
        if "kv_cache" in tags:
            self._cache = None
            self._kv_released = True
        if "weights" in tags:
            self.weights.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        """``kv_cache``: allow the cache again (reallocated lazily by the next generate).
        ``weights``: reallocate storage (undefined contents until ``update_weights``)."""
        check_memory_tags(tags)
        if "kv_cache" in tags:
            self._kv_released = False
        if "weights" in tags:
            self.weights.resume()

    def shutdown(self) -> None:
        self._cache = None
        self.weights.release()

    # --- interface: generate -------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        """``sampling.n`` results per request, grouped by request in request order."""
        self._check_ready("generate")
        requests = list(requests)
        keys = request_keys([r.request_id for r in requests])
        per_chunk = max(1, self.max_batch_rows // sampling.n)
        results: list[GenerationResult] = []
        with torch.inference_mode():
            for start in range(0, len(requests), per_chunk):
                chunk = requests[start:start + per_chunk]
                self.decoder.begin_generate()
                try:
                    results += self._generate_chunk(chunk, keys[start:start + per_chunk], sampling)
                finally:
                    self.decoder.end_generate()
        return results

    def prompt_logits(self, requests: Sequence[GenerationRequest]) -> Tensor:
        """Float32 logits ``[len(requests), vocab]`` of the token after each prompt: the raw
        next-token logits ``generate`` draws a first response token from (before temperature,
        top-k/p or banned ids), computed by the same prefill, at most ``max_batch_rows`` prompts
        per batch. For checks (e.g. that synced weights give the logits of a reference)."""
        self._check_ready("prompt_logits")
        requests = list(requests)
        out = []
        with torch.inference_mode():
            for start in range(0, len(requests), self.max_batch_rows):
                self.decoder.begin_generate()
                try:
                    out.append(self._prefill(requests[start:start + self.max_batch_rows], 1, 0)[0])
                finally:
                    self.decoder.end_generate()
        return torch.cat(out) if out else torch.empty(0, self.vocab)

    # --- internals -----------------------------------------------------------------------------
    def _check_ready(self, caller: str) -> None:
        if self.weights.released:
            raise RuntimeError(f"{caller} called while the weights are released; call "
                               "resume_memory(['weights']) and update_weights(...) first")
        if self.weights.missing:
            raise RuntimeError(f"{caller} called with {len(self.weights.missing)} weights not loaded since "
                               f"the last release (e.g. {sorted(self.weights.missing)[:3]}); call update_weights")
        if self._kv_released:
            raise RuntimeError(f"{caller} called while the KV cache is released; call resume_memory(['kv_cache'])")

    def _cache_for(self, rows: int, length: int) -> Tensor:
        """A ``[layers, 2, rows, kv_heads, length, head_dim]`` view of the (grown on demand) buffer."""
        d = self.decoder
        shape = (d.num_layers, 2, rows, d.kv_heads, length, d.head_dim)
        numel = torch.Size(shape).numel()
        if self._cache is None or self._cache.numel() < numel:
            self._cache = None
            self._cache = torch.empty(numel, device=self.device, dtype=self.dtype)
        return self._cache[:numel].view(shape)

    def _encode_images(self, requests: Sequence[GenerationRequest]) -> tuple[Tensor | None, Tensor | None, list]:
        """All images of the chunk in one vision-tower call: (grids, merged features, DeepStack)."""
        pixels, grids = [], []
        for r in requests:
            if (r.pixel_values is None) != (r.image_grid_thw is None):
                raise ValueError(f"request {r.request_id!r}: pixel_values and image_grid_thw go together")
            if r.pixel_values is not None:
                pixels.append(r.pixel_values)
                grids.append(r.image_grid_thw.reshape(-1, 3))
        if not pixels:
            return None, None, []
        grid = torch.cat(grids).to(self.device)
        pixel = torch.cat(pixels).to(self.device, self.dtype)
        if self._vision is not None:
            merged, deepstack = self._vision(pixel, grid)
            return grid, merged, deepstack
        out = self.weights.visual(pixel, grid_thw=grid, return_dict=True)
        return grid, out.pooler_output, list(out.deepstack_features)

    def _prefill(self, requests: Sequence[GenerationRequest], n: int, extra_slots: int):
        """Left-pad the prompts and prefill each once, its keys/values written to ``n`` rows of a
        cache of ``P + extra_slots`` slots (``P`` the padded prompt length). Returns the prompts'
        last-position logits ``[B, vocab]``, their lengths, MRoPE deltas, ``P``, pad mask, cache."""
        dev, dec = self.device, self.decoder
        b = len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        if min(lens) == 0:
            raise ValueError("empty prompt_ids")
        p = max(lens)
        ids = torch.zeros(b, p, dtype=torch.long)
        pad_mask = torch.zeros(b, p, dtype=torch.bool)
        for i, r in enumerate(requests):
            ids[i, p - lens[i]:] = torch.as_tensor(r.prompt_ids, dtype=torch.long)
            pad_mask[i, p - lens[i]:] = True
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise ValueError(f"prompt ids must lie in [0, {self.vocab})")
        ids, pad_mask = ids.to(dev), pad_mask.to(dev)

        grid, image_embeds, deepstack = self._encode_images(requests)
        positions, deltas = mrope_position_ids(ids, grid, None, pad_mask, image_token_id=self.image_token_id,
                                               video_token_id=self.video_token_id, spatial_merge_size=self.merge)
        x = torch.nn.functional.embedding(ids, self.weights.embed)
        visual_index = None
        if image_embeds is not None:
            visual_index = ((ids == self.image_token_id) & pad_mask).nonzero(as_tuple=True)
            if visual_index[0].numel() != image_embeds.shape[0]:
                raise ValueError(f"{visual_index[0].numel()} image tokens but the images give "
                                 f"{image_embeds.shape[0]} features")
            x = x.index_put(visual_index, image_embeds.to(x.dtype))

        cache = self._cache_for(b * n, p + extra_slots)
        logits = dec.prefill(x, positions, pad_mask, cache, n, visual_index, deepstack or None)
        return logits, lens, deltas, p, pad_mask, cache

    def _generate_chunk(self, requests: Sequence[GenerationRequest], keys: list[int],
                        sp: SamplingParams) -> list[GenerationResult]:
        dev, dec, n, max_new = self.device, self.decoder, sp.n, sp.max_new_tokens
        b = len(requests)
        logits, lens, deltas, p, pad_mask, cache = self._prefill(requests, n, max_new - 1)
        rows = b * n
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)

        # per live row: original row id, next text position, attention bias over slots, sampling key
        live = torch.arange(rows, device=dev)
        next_pos = (torch.tensor(lens, device=dev) + deltas.view(-1).to(dev)).repeat_interleave(n)
        rotary = torch.stack(dec.rotary_table(int(next_pos.max()) + max_new, self.dtype), dim=1)  # [pos, 2, D]
        bias = torch.full((rows, p + max_new), float("-inf"), dtype=self.dtype, device=dev)
        bias[:, :p].masked_fill_(pad_mask.repeat_interleave(n, dim=0), 0.0)
        rkeys = row_keys(keys, n, sp.seed, dev)
        sampler = Sampler(self.vocab, sp.temperature, sp.top_k, sp.top_p, dev, sp.banned_ids)
        stop_ids = torch.tensor(sorted(set(sp.stop_ids)), dtype=torch.long, device=dev) if sp.stop_ids else None
        kv = [(cache[i, 0], cache[i, 1]) for i in range(dec.num_layers)]

        # outputs of live rows (compacted with them), scattered to their original rows when they end
        tok_live = torch.zeros(rows, max_new, dtype=torch.long, device=dev)
        logp_live = torch.zeros(rows, max_new, dtype=torch.float32, device=dev)
        out_tokens, out_logp = torch.zeros_like(tok_live), torch.zeros_like(logp_live)
        out_len = torch.full((rows,), max_new, dtype=torch.long, device=dev)
        stopped = torch.zeros(rows, dtype=torch.bool, device=dev)
        for j in range(max_new):
            tokens, logp = sampler(logits, rkeys, j)
            tok_live.select(1, j).copy_(tokens)
            logp_live.select(1, j).copy_(logp)
            if stop_ids is not None:
                done = torch.isin(tokens, stop_ids)
                if bool(done.any()):  # finished rows leave the batch: compact everything they used
                    ended = live[done]
                    out_tokens[ended], out_logp[ended] = tok_live[done], logp_live[done]
                    out_len[ended] = j + 1
                    stopped[ended] = True
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    if j < max_new - 1:
                        r = keep.numel()
                        cache[:, :, :r, :, : p + j] = cache[:, :, keep, :, : p + j]
                        kv = [(kc[:r], vc[:r]) for kc, vc in kv]
                    live, next_pos, bias, rkeys, tokens, tok_live, logp_live = (
                        t[keep] for t in (live, next_pos, bias, rkeys, tokens, tok_live, logp_live))
            if j == max_new - 1:
                out_tokens[live], out_logp[live] = tok_live, logp_live
                break
            bias.select(1, p + j).fill_(0.0)
            cos_sin = rotary.index_select(0, next_pos + j)  # [R, 2, D]: one gather for both tables
            logits = dec.decode(tokens, cos_sin.narrow(1, 0, 1), cos_sin.narrow(1, 1, 1), p + j,
                                bias.narrow(1, 0, p + j + 1), kv)

        tok_l, logp_l, len_l, stop_l = (t.tolist() for t in (out_tokens, out_logp, out_len, stopped))
        return [GenerationResult(request_id=requests[i // n].request_id, sample_index=i % n,
                                 response_ids=tok_l[i][: len_l[i]], logprobs=logp_l[i][: len_l[i]],
                                 finish_reason="stop" if stop_l[i] else "length")
                for i in range(rows)]
