"""The embedded rollout engine against transformers' Qwen3-VL (the oracle) on tiny random weights.

Tolerances (float32 on CPU): greedy tokens must be identical to ``generate``; returned log-probs
must match a full HF forward pass over prompt + response to 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch

from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl
from megatron_prism.rollout import ENGINES, GenerationRequest, SamplingParams
from megatron_prism.rollout.embedded import EmbeddedEngine
from megatron_prism.rollout.embedded.weights import read_hf_tensors
from tests.models.cases import IMG, PATCH_DIM, VE, VS

LOGP_ATOL = 1e-4
TEXT_SPECS = [(3, []), (11, []), (6, [])]
IMAGE_SPECS = [(2, [[1, 4, 4]]), (5, []), (1, [[1, 4, 4], [1, 6, 2]]), (4, [[1, 2, 6]])]


def make_requests(specs: list[tuple[int, list[list[int]]]], seed: int) -> list[GenerationRequest]:
    """Per prompt: ``pre`` text tokens, then each image (vision start, pads, end, 2 tokens), then 3."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (pre, grids) in enumerate(specs):
        ids = torch.randint(0, 240, (pre,), generator=gen).tolist()
        for t, h, w in grids:
            ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + torch.randint(0, 240, (2,), generator=gen).tolist()
        ids += torch.randint(0, 240, (3,), generator=gen).tolist()
        thw = torch.tensor(grids) if grids else None
        pv = torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=gen) if grids else None
        out.append(GenerationRequest(ids, pv, thw, f"req{i}"))
    return out


def hf_batch(requests, responses=None) -> dict:
    """Left-padded prompts (+ right-padded responses) as HF model inputs."""
    responses = responses or [[] for _ in requests]
    p = max(len(r.prompt_ids) for r in requests)
    length = p + max(len(x) for x in responses)
    ids = torch.zeros(len(requests), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, resp) in enumerate(zip(requests, responses)):
        seq = r.prompt_ids + resp
        ids[i, p - len(r.prompt_ids): p + len(resp)] = torch.tensor(seq)
        mask[i, p - len(r.prompt_ids): p + len(resp)] = 1
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int())
    images = [r for r in requests if r.pixel_values is not None]
    if images:
        batch["pixel_values"] = torch.cat([r.pixel_values for r in images])
        batch["image_grid_thw"] = torch.cat([r.image_grid_thw for r in images])
    return batch


def hf_greedy(hf, requests, new_tokens: int) -> list[list[int]]:
    batch = hf_batch(requests)
    with torch.no_grad():
        out = hf.generate(**batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def hf_logprobs(hf, requests, responses, temperature: float) -> list[list[float]]:
    batch = hf_batch(requests, responses)
    with torch.no_grad():
        logits = hf(**batch).logits.float()
    logp = torch.log_softmax(logits / temperature, -1)
    p = max(len(r.prompt_ids) for r in requests)
    return [[float(logp[i, p + j - 1, tok]) for j, tok in enumerate(resp)] for i, resp in enumerate(responses)]


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    return {v: EmbeddedEngine(d) for v, d in tiny_dirs.items()}


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def test_registered():
    assert ENGINES.get("embedded") is EmbeddedEngine


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("specs", [TEXT_SPECS, IMAGE_SPECS], ids=["text", "images"])
def test_greedy_matches_hf_generate(engines, hf_models, variant, specs):
    requests = make_requests(specs, seed=1)
    results = engines[variant].generate(requests, GREEDY)
    assert [r.response_ids for r in results] == hf_greedy(hf_models[variant], requests, GREEDY.max_new_tokens)
    assert all(r.finish_reason == "length" and len(r.logprobs) == 10 for r in results)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    # greedy log-probs are those of the unscaled model distribution
    ref = hf_logprobs(hf_models[variant], requests, [r.response_ids for r in results], 1.0)
    for res, lp in zip(results, ref):
        torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(lp), atol=LOGP_ATOL, rtol=0)


def test_stop_ids_truncate_and_rows_leave_the_batch(engines):
    requests = make_requests(IMAGE_SPECS, seed=2)
    full_results = engines["a"].generate(requests, GREEDY)
    full = [r.response_ids for r in full_results]
    counts = torch.bincount(torch.tensor([t for resp in full for t in set(resp)]))
    common = int(counts.argmax())  # the token found in the most responses: rows stop at different steps
    for stops in ([common], [full[0][-1]], [common, full[1][0]]):
        sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop_ids=stops)
        results = engines["a"].generate(requests, sp)
        for res, ref in zip(results, full):
            cut = min((ref.index(s) for s in stops if s in ref), default=None)
            if cut is not None:
                assert res.response_ids == ref[: cut + 1] and res.finish_reason == "stop"
            else:
                assert res.response_ids == ref and res.finish_reason == "length"
            assert len(res.logprobs) == len(res.response_ids)
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop_ids=[common])
    results = engines["a"].generate(requests, sp)
    assert sum(r.finish_reason == "stop" for r in results) >= 2
    for res, ref in zip(results, full_results):  # compacting the batch leaves the others' numbers alone
        torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(ref.logprobs[: len(res.logprobs)]),
                                   atol=1e-5, rtol=0)


def test_sampled_stop_is_a_prefix_of_the_unstopped_sample(engines):
    requests = make_requests(IMAGE_SPECS, seed=12)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=3)
    full = [r.response_ids for r in engines["b"].generate(requests, sp)]
    common = int(torch.bincount(torch.tensor([t for resp in full for t in set(resp)])).argmax())
    sp_stop = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=3, stop_ids=[common])
    stopped = engines["b"].generate(requests, sp_stop)
    assert sum(r.finish_reason == "stop" for r in stopped) >= 2
    for res, ref in zip(stopped, full):
        assert res.response_ids == (ref[: ref.index(common) + 1] if common in ref else ref)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_sampled_logprobs_match_hf_forward(engines, hf_models, variant):
    requests = make_requests(IMAGE_SPECS, seed=3)
    sp = SamplingParams(n=3, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=8, seed=5)
    results = engines[variant].generate(requests, sp)
    assert [(r.request_id, r.sample_index) for r in results] == [
        (q.request_id, i) for q in requests for i in range(3)]
    expanded = [q for q in requests for _ in range(3)]
    ref = hf_logprobs(hf_models[variant], expanded, [r.response_ids for r in results], sp.temperature)
    for res, lp in zip(results, ref):
        torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(lp), atol=LOGP_ATOL, rtol=0)


def test_seeding(engines, tiny_dirs):
    engine = engines["a"]
    requests = make_requests(IMAGE_SPECS, seed=4)
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=7)
    first = [r.response_ids for r in engine.generate(requests, sp)]
    assert first == [r.response_ids for r in engine.generate(requests, sp)]
    other = [r.response_ids for r in engine.generate(requests, SamplingParams(n=4, max_new_tokens=12, seed=8))]
    assert other != first
    groups = [first[i:i + 4] for i in range(0, len(first), 4)]
    assert all(len({tuple(s) for s in g}) > 1 for g in groups)  # the n samples of a request differ
    # independent of batch composition and chunking
    alone = [r.response_ids for r in engine.generate(requests[2:3], sp)]
    assert alone == first[8:12]
    chunked = EmbeddedEngine(tiny_dirs["a"], max_batch_rows=5)
    assert [r.response_ids for r in chunked.generate(requests, sp)] == first


def test_top_k_one_is_greedy(engines):
    requests = make_requests(IMAGE_SPECS, seed=5)
    greedy = [r.response_ids for r in engines["b"].generate(requests, GREEDY)]
    sampled = engines["b"].generate(requests, SamplingParams(n=2, temperature=1.3, top_k=1, max_new_tokens=10))
    assert [r.response_ids for r in sampled] == [g for g in greedy for _ in range(2)]


def test_images_encoded_once_per_generate(engines, monkeypatch):
    engine = engines["a"]
    calls = []
    # the CPU float32 engine encodes through its own VisionTower, other engines through HF's module
    owner, name = (engine, "_vision") if engine._vision is not None else (engine.weights.visual, "forward")
    forward = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or forward(*a, **k))
    engine.generate(make_requests(IMAGE_SPECS, seed=6), SamplingParams(n=4, max_new_tokens=6))
    assert len(calls) == 1


@pytest.mark.parametrize("joint", [True, False])
def test_cpu_vision_tower_matches_hf(engines, monkeypatch, joint):
    """The CPU VisionTower against HF's module on the same parameters, all images in one masked
    attention call (``joint``) and per image; then after in-place weight changes (it must read the
    module's parameters, not copies). A grid with two temporal frames (attended separately,
    as in HF). Tolerance: float32 rounding order, 1e-5 absolute."""
    from megatron_prism.rollout.embedded import vision

    engine = engines["a"]
    monkeypatch.setattr(vision, "JOINT_MAX", 1024 if joint else 0)
    reqs = [r for r in make_requests(IMAGE_SPECS + [(1, [[1, 4, 4], [2, 4, 2]])], seed=8) if r.pixel_values is not None]
    pixels = torch.cat([r.pixel_values for r in reqs])
    grid = torch.cat([r.image_grid_thw for r in reqs])
    visual = engine.weights.visual
    saved = {k: v.clone() for k, v in visual.state_dict().items()}
    try:
        for changed in (False, True):
            if changed:
                with torch.no_grad():
                    for prm in visual.parameters():
                        prm.mul_(1.5).add_(0.01)
            with torch.inference_mode():
                ref = visual(pixels, grid_thw=grid, return_dict=True)
                merged, deepstack = engine._vision(pixels, grid)
            torch.testing.assert_close(merged, ref.pooler_output, atol=1e-5, rtol=0)
            assert len(deepstack) == len(ref.deepstack_features)
            for ours, theirs in zip(deepstack, ref.deepstack_features):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    finally:
        visual.load_state_dict(saved)


def test_update_weights_from_buckets(tmp_path, tiny_dirs, hf_models):
    engine = EmbeddedEngine(tiny_dirs["a"])
    assert engine.weight_version is None
    new_dir = save_random_qwen3vl(tmp_path / "a2", "a", seed=123)
    items = list(read_hf_tensors(new_dir).items())
    engine.update_weights([items[i:i + 7] for i in range(0, len(items), 7)], version=3)
    assert engine.weight_version == 3
    requests = make_requests(IMAGE_SPECS, seed=7)
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=1)
    got = engine.generate(requests, sp)
    want = EmbeddedEngine(new_dir).generate(requests, sp)
    assert [(r.response_ids, r.logprobs) for r in got] == [(r.response_ids, r.logprobs) for r in want]

    with pytest.raises(KeyError, match="model.language_model.layers.0.bogus.weight"):
        engine.update_weights([[("model.language_model.layers.0.bogus.weight", torch.zeros(3))]])
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj.weight: got \(5, 64\), expected \(128, 64\)"):
        engine.update_weights([[("model.language_model.layers.1.mlp.up_proj.weight", torch.zeros(5, 64))]])

    # a tied model's state_dict() (which lists lm_head.weight as an alias) loads into engine b
    engine_b = EmbeddedEngine(new_dir_b := save_random_qwen3vl(tmp_path / "b2", "b", seed=5))
    engine_b.update_weights([list(hf_models["b"].state_dict().items())], version=9)
    assert engine_b.generate(requests, GREEDY)[0].response_ids == hf_greedy(hf_models["b"], requests[:1], 10)[0]
    assert new_dir_b.exists()


def test_release_and_resume(tiny_dirs):
    engine = EmbeddedEngine(tiny_dirs["b"])
    requests = make_requests(IMAGE_SPECS, seed=8)
    ref = [r.response_ids for r in engine.generate(requests, GREEDY)]

    engine.release_memory(["kv_cache"])
    assert engine._cache is None
    with pytest.raises(RuntimeError, match="KV cache is released"):
        engine.generate(requests, GREEDY)
    engine.resume_memory(["kv_cache"])
    assert [r.response_ids for r in engine.generate(requests, GREEDY)] == ref

    engine.release_memory()  # both tags
    assert all(s.nbytes() == 0 for s, _ in engine.weights._storages)
    with pytest.raises(RuntimeError, match="weights are released"):
        engine.generate(requests, GREEDY)
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.update_weights([list(read_hf_tensors(tiny_dirs["b"]).items())], version=1)
    engine.resume_memory()
    with pytest.raises(RuntimeError, match="not loaded since the last release"):
        engine.generate(requests, GREEDY)
    items = list(read_hf_tensors(tiny_dirs["b"]).items())
    engine.update_weights([items[:10]], version=1)  # partial: still refuses, version not set
    assert engine.weight_version is None
    engine.update_weights([items[10:]], version=2)
    assert engine.weight_version == 2
    assert [r.response_ids for r in engine.generate(requests, GREEDY)] == ref
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.release_memory(["activations"])


def test_from_tensor_dict_and_errors(tiny_dirs):
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig.from_pretrained(tiny_dirs["a"])
    engine = EmbeddedEngine(read_hf_tensors(tiny_dirs["a"]), config)
    requests = make_requests(TEXT_SPECS, seed=9)
    assert engine.generate(requests, GREEDY)[1].response_ids == EmbeddedEngine(tiny_dirs["a"]).generate(
        requests, GREEDY)[1].response_ids
    bad = make_requests([(2, [[1, 4, 4]])], seed=9)
    bad[0].pixel_values = None
    with pytest.raises(ValueError, match="go together"):
        engine.generate(bad, GREEDY)
    bad[0].image_grid_thw = None
    with pytest.raises(ValueError, match="more image placeholder tokens than grids"):
        engine.generate(bad, GREEDY)


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (3, 1.0), (-1, 0.8), (4, 0.7)])
def test_sampler_draws_from_the_truncated_distribution(top_k, top_p):
    from megatron_prism.rollout.embedded.sampling import Sampler, row_keys

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    sampler = Sampler(6, 0.7, top_k, top_p, torch.device("cpu"))
    tokens, logp = sampler(logits, row_keys(list(range(20000)), 1, seed=0, device=torch.device("cpu")), step=0)
    probs = torch.softmax(logits[0] / 0.7, -1)
    torch.testing.assert_close(logp, probs.log()[tokens])  # log-probs are pre-truncation
    want = probs.clone()
    if top_k > 0:
        want[top_k:] = 0
        want /= want.sum()
    want = want * ((want.cumsum(0) - want) <= top_p)
    freq = torch.bincount(tokens, minlength=6).float() / 20000
    torch.testing.assert_close(freq, want / want.sum(), atol=0.015, rtol=0)  # ~4 standard errors


def test_banned_ids_are_never_sampled(tiny_dirs):
    """Banning the greedy choice changes the output; a sampled run never emits a banned id."""
    from megatron_prism.rollout import GenerationRequest, SamplingParams
    from megatron_prism.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(tiny_dirs["a"])
    request = [GenerationRequest(list(range(10, 20)), request_id="r")]
    greedy = engine.generate(request, SamplingParams(temperature=0.0, max_new_tokens=6))[0].response_ids
    banned = list(range(0, 256, 2)) + [greedy[0]]
    again = engine.generate(request, SamplingParams(temperature=0.0, max_new_tokens=6, banned_ids=banned))[0]
    assert again.response_ids[0] != greedy[0]
    sampled = engine.generate(request, SamplingParams(n=8, temperature=1.5, max_new_tokens=8, banned_ids=banned, seed=3))
    assert all(t not in set(banned) for r in sampled for t in r.response_ids)
