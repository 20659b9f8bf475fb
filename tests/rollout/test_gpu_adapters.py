"""The SGLang and vLLM adapters.

On CPU there is no sglang or vllm, so :class:`RecordingSGLangDouble` and :class:`RecordingVLLMDouble`
stand in for ``sglang.Engine`` / ``vllm.LLM``. They are recording doubles: they record the calls
the adapters make and answer "ok"; they do not generate, hold memory or load weights. The CPU
tests check only what an adapter sends: the order of the colocated sync (release, resume weights,
k weight updates, resume KV cache, flush) and the buckets' sizes and contents (against the HF
checkpoint the policy was built from). Whether SGLang / vLLM accept those calls is for the
``gpu``-marked tests at the end, which run the real engines on the tiny model (skipped on CPU).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.rollout import ENGINES, GenerationRequest, SamplingParams
from megatron_prism.rollout import sglang_engine
from megatron_prism.rollout.sglang_engine import SGLangEngine
from megatron_prism.rollout.vllm_engine import VLLMEngine, collapse_image_pads
from megatron_prism.rollout.weight_sync import export_hf_weights, sync_weights, tensor_bytes
from recording_doubles import RecordingSGLangDouble, RecordingVLLMDouble, plain_codec  # noqa: F401

BUCKET = 48 << 10


def _hf_state(hf_dir) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def gpu_engine_model(tmp_path_factory):
    """A bf16 Qwen3-VL real engines take (head_dim 64, tokenizer, preprocessor_config.json)."""
    from megatron_prism.data.synth import save_tokenizer, train_tokenizer
    from megatron_prism.models.qwen3vl.tiny import GPU_ENGINE_SHAPE, save_tiny_for_tokenizer

    root = tmp_path_factory.mktemp("gpu_engine_model")
    texts = [f"what is {a} + {b}? the answer is {a + b}." for a in range(20) for b in range(5)]
    tok = save_tokenizer(train_tokenizer(texts, vocab_size=300), root / "tokenizer")
    return save_tiny_for_tokenizer(root / "model", tok, seed=3, shape=GPU_ENGINE_SHAPE, dtype=torch.bfloat16,
                                   with_preprocessor=True)


@pytest.fixture(scope="module")
def policy(tiny_dirs):
    from megatron_prism.models import build_policy

    return build_policy(tiny_dirs["a"]), read_hf_config(tiny_dirs["a"])


def _expected_bucket_sizes(model, hf_config) -> list[list[str]]:
    from megatron_prism.rollout.weight_sync import bucketize

    return [[n for n, _ in b] for b in bucketize(export_hf_weights(model, hf_config), BUCKET)]


# ---- SGLang -------------------------------------------------------------------------------------


def test_sglang_colocated_sync_order_and_buckets(policy, tiny_dirs, plain_codec):
    model, hf_config = policy
    expected = _expected_bucket_sizes(model, hf_config)
    assert len(expected) > 3
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double, tp_size=2)
    engine.release_memory()
    stats = sync_weights(engine, model, hf_config, BUCKET, version=3)

    k = len(expected)  # one raw-byte payload per bucket, whatever its dtypes
    assert double.calls[0] == ("release", None)  # None: all of 0.5.23's tags (weights, kv_cache, cuda_graph)
    assert double.calls[1] == ("resume", ("weights",))
    assert double.calls[2:2 + k] == [("update", "flattened_bucket", False)] * k
    assert double.calls[2 + k:] == [("resume", ("kv_cache", "cuda_graph")), ("flush",)]
    assert double.offloaded == set()
    assert engine.weight_version == 3
    assert stats["buckets"] == k and stats["tensors"] == sum(map(len, expected)) and stats["gb_per_s"] > 0

    ref = _hf_state(tiny_dirs["a"])
    seen: dict[str, torch.Tensor] = {}
    for i, names in enumerate(expected):
        assert len(double.payloads[i]) == 2  # one payload per engine TP rank ...
        assert double.payloads[i][0] is not double.payloads[i][1]  # ... each serialized on its own
        for rank in (0, 1):
            got = double.tensors(i, rank)
            assert [n for n, _ in got] == names
            size = sum(tensor_bytes(t) for _, t in got)
            assert size <= BUCKET or len(got) == 1
            seen.update(got)
    # checked after the whole sync: no payload's buffer was reused for a later bucket
    assert set(seen) == set(ref) and all(torch.equal(seen[n], t) for n, t in ref.items())


def test_sglang_mixed_dtypes_share_one_byte_payload(plain_codec):
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double)
    bucket = [("a", torch.ones(3, dtype=torch.bfloat16)), ("b", torch.arange(4.0)), ("c", torch.zeros(2, 3, dtype=torch.bfloat16))]
    engine.update_weights([bucket], version=None)
    assert [c[0] for c in double.calls] == ["update", "flush"]
    got = dict(double.tensors(0))
    assert list(got) == ["a", "b", "c"] and all(torch.equal(got[n], t) for n, t in bucket)
    engine.resume_memory()  # nothing released: no call, no second flush
    assert len(double.calls) == 2


def test_sglang_memory_tags_track_what_is_released(plain_codec):
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double)
    engine.release_memory(["kv_cache"])
    engine.release_memory()  # the rest: weights only (kv_cache and cuda_graph already out)
    engine.resume_memory()
    assert double.calls == [("release", ("kv_cache", "cuda_graph")), ("release", ("weights",)),
                            ("resume", ("weights", "kv_cache", "cuda_graph"))]
    engine.resume_memory()  # nothing released: SGLang would raise KeyError for a second resume
    assert len(double.calls) == 3
    engine.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.update_weights([[("w", torch.ones(2))]], version=1)
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([GenerationRequest([1, 2], request_id="r")], SamplingParams())


def test_sglang_generate_passes_banned_ids_and_a_seed_per_row(plain_codec):
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double)
    out = engine.generate([GenerationRequest([1, 2], request_id="r0"), GenerationRequest([3], request_id="r1")],
                          SamplingParams(n=2, max_new_tokens=4, stop_ids=[9], banned_ids=[5, 6], seed=11))
    params = double.generate_kwargs["sampling_params"]
    assert double.generate_kwargs["input_ids"] == [[1, 2], [1, 2], [3], [3]]
    assert all(p["logit_bias"] == {"5": -1e9, "6": -1e9} and p["stop_token_ids"] == [9] for p in params)
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 4  # the n copies of a prompt must not draw the same sample
    assert [(r.request_id, r.sample_index, r.response_ids) for r in out] == [
        ("r0", 0, [7]), ("r0", 1, [7]), ("r1", 0, [7]), ("r1", 1, [7])]


def test_sglang_codec_uses_the_0523_module_paths(monkeypatch):
    """The codec imports 0.5.23's paths and runs the torch patch (no silent skip): on CPU, with
    no sglang, that is an ImportError naming ``sglang``, not a pass."""
    import inspect

    if importlib.util.find_spec("sglang") is None:
        with pytest.raises(ImportError, match="sglang"):
            sglang_engine._sglang_codec()
    else:
        meta_cls, _ = sglang_engine._sglang_codec()
        assert meta_cls.__module__ == "sglang.srt.weight_sync.tensor_bucket"

    src = inspect.getsource(sglang_engine._sglang_codec)
    assert "sglang.srt.utils.patch_torch" in src and "sglang.srt.weight_sync.tensor_bucket" in src
    assert "except ImportError" not in src


# ---- vLLM ---------------------------------------------------------------------------------------


def test_collapse_image_pads_keeps_one_pad_per_image():
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 9, 3], 9) == [1, 9, 2, 9, 3]
    assert collapse_image_pads([4, 5], 9) == [4, 5]


def test_vllm_colocated_sync_order_and_buckets(policy, tiny_dirs):
    model, hf_config = policy
    expected = _expected_bucket_sizes(model, hf_config)
    double = RecordingVLLMDouble()
    engine = VLLMEngine(llm=double)
    engine.release_memory()
    sync_weights(engine, model, hf_config, BUCKET, version=5, dst_rank_only=False)
    k = len(expected)
    assert double.calls == ([("sleep", 2), ("wake_up", ("weights",))] + [("load_weights",)] * k
                            + [("wake_up", ("kv_cache",)), ("reset_prefix_cache",)])
    assert [[n for n, _ in b] for b in double.buckets] == expected  # in-process, tensors as they are
    ref = _hf_state(tiny_dirs["a"])
    for bucket in double.buckets:
        assert sum(tensor_bytes(t) for _, t in bucket) <= BUCKET or len(bucket) == 1
        assert all(torch.equal(t, ref[n]) for n, t in bucket)
    assert engine.weight_version == 5


def test_vllm_memory_tags():
    double = RecordingVLLMDouble()
    engine = VLLMEngine(llm=double, sleep_level=1)
    with pytest.raises(ValueError, match="together"):
        engine.release_memory(["kv_cache"])
    engine.release_memory()
    engine.release_memory()  # already asleep: no second call
    engine.resume_memory()
    assert double.calls == [("sleep", 1), ("wake_up", ("weights", "kv_cache"))]
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.resume_memory(["optimizer"])


def test_vllm_image_prompt_is_unexpanded_with_the_exact_image():
    """An image request becomes one placeholder per image plus the very image our processor
    made the pixel values from (so vLLM's processor neither re-expands nor resizes it)."""
    import numpy as np
    from PIL import Image

    from megatron_prism.data.images import ImageSettings, patchify, tokens_per_image

    s = ImageSettings(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 64)
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (21, 35, 3), dtype=np.uint8))
    pv, grid = patchify(img, s)
    grid_t = torch.tensor([grid])
    pad = 99
    n_pads = tokens_per_image(grid_t, s)[0]
    ids = [1, 2, 98] + [pad] * n_pads + [97, 3]
    engine = VLLMEngine(llm=RecordingVLLMDouble(), image_token_id=pad, images=s)
    prompt = engine.prompt(GenerationRequest(ids, pv, grid_t, "r"))
    assert prompt["prompt_token_ids"] == [1, 2, 98, pad, 97, 3]
    (picture,) = prompt["multi_modal_data"]["image"]
    again, grid2 = patchify(picture, s)  # what vLLM's processor would compute from it
    assert grid2 == grid and torch.allclose(again, pv, atol=1e-6)
    area = picture.width * picture.height
    assert prompt["mm_processor_kwargs"] == {"min_pixels": area, "max_pixels": area}
    with pytest.raises(ValueError, match="image pads"):
        engine.prompt(GenerationRequest(ids[:-3] + [3], pv, grid_t, "bad"))


# ---- registration and missing packages ----------------------------------------------------------


def test_engines_are_registered():
    assert ENGINES.get("sglang") is SGLangEngine and ENGINES.get("vllm") is VLLMEngine


@pytest.mark.parametrize("cls,module,extra", [(SGLangEngine, "sglang", "[sglang]"), (VLLMEngine, "vllm", "[vllm]")])
def test_missing_package_or_cuda_is_a_clear_error(cls, module, extra, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        cls("/some/model")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name == module else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        cls("/some/model")


def test_constructing_here_without_the_packages_fails_clearly():
    """On this CPU machine (no sglang / vllm): the real constructors refuse with the extra's name."""
    for cls, module, extra in ((SGLangEngine, "sglang", "[sglang]"), (VLLMEngine, "vllm", "[vllm]")):
        if importlib.util.find_spec(module) is not None:
            continue  # installed (a GPU machine): covered by the test above and the gpu tests
        with pytest.raises(ImportError) as err:
            cls("/some/model")
        assert extra in str(err.value) and module in str(err.value)


def test_hf_processor_given_the_rebuilt_image_reproduces_our_pixel_values(gpu_engine_model):
    """What vLLM's Qwen3-VL processor computes from the adapter's prompt: transformers' image
    processor, configured by the test model's preprocessor_config.json, on the rebuilt image with
    the adapter's min/max pixels gives exactly the pixel values the trainer uses."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from megatron_prism.data.images import patchify, settings_for_model, tokens_per_image

    s = settings_for_model(gpu_engine_model, patch_size=16, merge_size=2, temporal_patch_size=2)
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 411, 3), dtype=np.uint8))
    pv, grid = patchify(img, s)
    grid_t = torch.tensor([grid])
    pad = 7
    engine = VLLMEngine(llm=RecordingVLLMDouble(), image_token_id=pad, images=s)
    prompt = engine.prompt(GenerationRequest([1] + [pad] * tokens_per_image(grid_t, s)[0] + [2], pv, grid_t, "r"))
    hf = AutoImageProcessor.from_pretrained(str(gpu_engine_model), local_files_only=True)
    out = hf(images=prompt["multi_modal_data"]["image"], **prompt["mm_processor_kwargs"], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [list(grid)]
    assert torch.equal(out["pixel_values"].to(pv.dtype), pv)


def test_the_gpu_test_model_is_one_real_engines_take(gpu_engine_model):
    """bf16, head_dim >= 64, KV heads that split over TP 2, a tokenizer and a preprocessor config."""
    import json

    cfg = json.loads((gpu_engine_model / "config.json").read_text())
    text = cfg["text_config"]
    assert text["head_dim"] >= 64 and text["num_key_value_heads"] % 2 == 0
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    names = {f.name for f in gpu_engine_model.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "model.safetensors"} <= names
    from megatron_prism.data.processing import load_tokenizer

    load_tokenizer(gpu_engine_model)  # has Qwen's chat and vision tokens


# ---- real engines (GPU only) --------------------------------------------------------------------


def _text_requests() -> list[GenerationRequest]:
    return [GenerationRequest(prompt_ids=[5, 17, 42, 9], request_id="r0"),
            GenerationRequest(prompt_ids=[100, 3, 7], request_id="r1")]


def _check_results(results, n: int, max_new: int) -> None:
    assert [(r.request_id, r.sample_index) for r in results] == [(f"r{i}", s) for i in range(2) for s in range(n)]
    for r in results:
        assert 1 <= len(r.response_ids) <= max_new and len(r.logprobs) == len(r.response_ids)
        assert all(lp <= 0 and lp == lp for lp in r.logprobs) and r.finish_reason in ("stop", "length")


def _perturbed_policy(hf_dir):
    from megatron_prism.models import build_policy

    model = build_policy(hf_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                p.mul_(-1.0)
    return model


def _image_request(model_dir, request_id: str = "img") -> GenerationRequest:
    import numpy as np
    from PIL import Image

    from megatron_prism.data import chat
    from megatron_prism.data.images import patchify, settings_for_model, tokens_per_image
    from megatron_prism.data.processing import load_tokenizer

    tok = load_tokenizer(model_dir)
    s = settings_for_model(model_dir, patch_size=16, merge_size=2, temporal_patch_size=2)
    pv, grid = patchify(Image.fromarray(np.random.default_rng(2).integers(0, 256, (256, 320, 3), dtype=np.uint8)), s)
    grid_t = torch.tensor([grid])
    ids = [tok.convert_tokens_to_ids(t) for t in (chat.VISION_START,)]
    ids += [tok.convert_tokens_to_ids(chat.IMAGE_PAD)] * tokens_per_image(grid_t, s)[0]
    ids += [tok.convert_tokens_to_ids(chat.VISION_END), 5, 17]
    return GenerationRequest(ids, pv.to(torch.bfloat16), grid_t, request_id)


def _run_engine(engine_cls, model_dir) -> None:
    """Start with dummy weights, sync real ones, generate text and one image prompt, release,
    sync perturbed weights, generate again: the log-probs must change."""
    from megatron_prism.parallel.rollout_groups import engine_device
    from megatron_prism.rollout.placement import place_engine

    engine = engine_cls.launch(model_dir, place_engine(0, 1, 1, 0.3, 30500, seed=1), engine_device())
    try:
        hf_config = read_hf_config(model_dir)
        from megatron_prism.models import build_policy

        sync_weights(engine, build_policy(model_dir, dtype=torch.bfloat16), hf_config, 1 << 20, version=1,
                     dst_rank_only=not engine_cls.spmd)
        greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
        before = engine.generate(_text_requests(), greedy)
        _check_results(before, 2, 6)
        (img,) = [r for r in engine.generate([_image_request(model_dir)], greedy)][:1]
        assert img.request_id == "img" and len(img.response_ids) >= 1
        engine.release_memory()
        sync_weights(engine, _perturbed_policy(model_dir), hf_config, 1 << 20, version=7,
                     dst_rank_only=not engine_cls.spmd)
        assert engine.weight_version == 7
        after = engine.generate(_text_requests(), greedy)
        _check_results(after, 2, 6)
        assert [r.logprobs for r in after] != [r.logprobs for r in before]
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_sglang_engine_on_the_gpu_test_model(gpu_engine_model):
    _run_engine(SGLangEngine, gpu_engine_model)


@pytest.mark.gpu
def test_vllm_engine_on_the_gpu_test_model(gpu_engine_model, monkeypatch):
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    _run_engine(VLLMEngine, gpu_engine_model)


@pytest.mark.gpu
def test_sglang_tp2_sync_into_a_real_engine(gpu_engine_model):
    """Full HF tensors sync into a real SGLang engine of TP=2: each of its ranks deserializes its
    own payload and takes its shard (``tests/rollout/test_sync_tp2.py`` covers a TP=2 export)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from megatron_prism.rollout.placement import place_engine

    engine = SGLangEngine.launch(gpu_engine_model, place_engine(0, 2, 2, 0.3, 30600), torch.device("cuda", 0))
    try:
        sync_weights(engine, _perturbed_policy(gpu_engine_model), read_hf_config(gpu_engine_model), 1 << 20, version=2)
        _check_results(engine.generate(_text_requests(), SamplingParams(n=2, temperature=0.0, max_new_tokens=6)), 2, 6)
    finally:
        engine.shutdown()
