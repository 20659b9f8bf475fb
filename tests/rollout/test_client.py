"""The rollout client: engine groups and placement, the colocated lifecycle (start with dummy
weights -> resume weights -> sync -> resume KV cache -> generate -> release all), and the
ranks that wait for a shared engine on a gloo group.

The embedded engine runs for real (its release must visibly free the process's memory); the
SGLang / vLLM adapters run over the *recording doubles* of ``test_gpu_adapters`` (they record the
calls made on ``sglang.Engine`` / ``vllm.LLM``; whether the real engines accept them is for the
``gpu``-marked tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.parallel.rollout_groups import engine_groups
from megatron_prism.rollout import GenerationRequest, SamplingParams
from megatron_prism.rollout.client import EngineSettings, RolloutClient
from megatron_prism.rollout.placement import check_free_memory, place_engine, sglang_mem_fraction
from megatron_prism.rollout.sglang_engine import SGLangEngine
from megatron_prism.rollout.vllm_engine import VLLMEngine
from recording_doubles import RecordingSGLangDouble, RecordingVLLMDouble, plain_codec  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("wait_group_worker.py")
GiB = 2**30


# ---- groups and placement (pure) ----------------------------------------------------------------


def test_engine_groups_are_model_parallel_groups_or_blocks_of_rollout_tp():
    tp2 = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert engine_groups(8, 1, tp2) == tp2
    assert engine_groups(8, 4, tp2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pp2 = [[0, 4], [1, 5], [2, 6], [3, 7]]  # megatron's PP groups are strided
    assert engine_groups(8, 1, pp2) == pp2
    with pytest.raises(ValueError, match="straddles"):
        engine_groups(8, 2, pp2)
    with pytest.raises(ValueError, match="does not divide"):
        engine_groups(8, 3, tp2)


def test_each_engine_gets_its_own_gpu_and_ports():
    places = [place_engine(r, 8, 1, 0.3, 30000) for r in range(8)]
    assert [p.gpu_id for p in places] == list(range(8))
    ports = [p.port for p in places] + [p.nccl_port for p in places]
    assert len(set(ports)) == 16
    tp4 = [place_engine(r, 8, 4, 0.3, 30000) for r in (0, 4)]
    assert [p.gpu_id for p in tp4] == [0, 4] and tp4[0].port != tp4[1].port and tp4[0].tp == 4
    with pytest.raises(ValueError, match="must divide the processes per node"):
        place_engine(6, 8, 4, 0.3, 30000)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
            place_engine(0, 8, 1, bad, 30000)


def test_memory_is_sized_from_the_total():
    # 80 GiB GPU, the trainer holds 30: SGLang sizes from the 50 free, so 0.3 of total is 24/50 of free
    assert sglang_mem_fraction(0.3, 50 * GiB, 80 * GiB) == pytest.approx(24 / 50)
    assert sglang_mem_fraction(0.3, 80 * GiB, 80 * GiB) == pytest.approx(0.3)
    with pytest.raises(RuntimeError, match=r"rollout.gpu_memory_fraction=0.5 asks 40.0 GiB .* only 30.0 GiB"):
        check_free_memory(0.5, 30 * GiB, 80 * GiB)


# ---- the lifecycle on the embedded engine (real) ------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_dirs):
    from megatron_prism.models import build_policy

    return SimpleNamespace(chunks=[build_policy(tiny_dirs["a"])], hf_config=read_hf_config(tiny_dirs["a"]))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_embedded_lifecycle_releases_after_generating_and_resyncs(runtime, tiny_dirs):
    client = RolloutClient(EngineSettings(engine="embedded"), tiny_dirs["a"])
    client.start()  # dummy weights, released at once: nothing held until the first sync
    engine = client.engine
    assert engine is not None and engine.resident_bytes() == 0
    with pytest.raises(RuntimeError, match="before the first sync"):
        client.generate([GenerationRequest([5, 17], request_id="r")], SamplingParams())

    client.sync(runtime)
    assert engine.resident_bytes() >= engine.weights.nbytes() > 0 and engine.weight_version == 1
    # 256 rows x ~250 slots: a KV cache of ~64 MiB, above glibc's largest mmap threshold, so
    # freeing it must give the pages back to the OS
    long = [GenerationRequest([(7 * i) % 200 + 3 for i in range(250)], request_id="long")]
    sampling = SamplingParams(n=256, temperature=1.0, max_new_tokens=2, seed=4)
    engine.release_memory = _measured(engine.release_memory, engine)
    first = client.generate(long, sampling)
    held, before, after = engine.last_release
    assert held > 60 * 2**20, held
    assert engine.resident_bytes() == 0  # weights and KV cache both gone after generating
    assert before - after > 0.8 * held, (before, after, held)  # and the process really shrank

    # the next generate, with no sync in between, syncs the last runtime again: same weights, same draws
    again = client.generate(long, sampling)
    assert client.version == 2 and engine.weight_version == 2
    assert [r.response_ids for r in again] == [r.response_ids for r in first]
    assert engine.resident_bytes() == 0
    client.shutdown()


def _measured(release, engine):
    def wrapped(tags=("weights", "kv_cache")):
        held, before = engine.resident_bytes(), _rss()
        release(tags)
        engine.last_release = (held, before, _rss())
    return wrapped


def test_an_unknown_engine_is_one_line():
    with pytest.raises(KeyError, match="vllmm"):
        RolloutClient(EngineSettings(engine="vllmm"), ".")


# ---- the lifecycle through the GPU adapters (recording doubles) ---------------------------------


def test_sglang_call_order_through_the_client(runtime, tiny_dirs, plain_codec, monkeypatch):  # noqa: F811
    double = RecordingSGLangDouble()
    launched = []

    def launch(cls, config_dir, placement, device):
        launched.append((Path(config_dir), placement))
        return cls(engine=double, tp_size=placement.tp)

    monkeypatch.setattr(SGLangEngine, "launch", classmethod(launch))
    client = RolloutClient(EngineSettings(engine="sglang", gpu_memory_fraction=0.3, port_base=31000), tiny_dirs["a"])
    client.sync(runtime)
    (config_dir, placement), = launched
    assert config_dir == tiny_dirs["a"] and placement.gpu_id == 0 and placement.memory_fraction == 0.3
    assert placement.port == 31000
    k = sum(1 for c in double.calls if c[0] == "update")
    assert k >= 1  # the default 512 MiB bucket holds the whole tiny model
    lifecycle = [("release", None), ("resume", ("weights",))] + [("update", "flattened_bucket", False)] * k + [
        ("resume", ("kv_cache", "cuda_graph")), ("flush",)]
    assert double.calls == lifecycle  # started, released until the sync, then resumed weights -> sync -> KV
    double.calls.clear()
    client.generate([GenerationRequest([5, 17], request_id="r")], SamplingParams(max_new_tokens=1))
    assert double.calls == [("generate",), ("release", None)]  # everything released right after
    double.calls.clear()
    client.generate([GenerationRequest([5, 17], request_id="r")], SamplingParams(max_new_tokens=1))
    assert double.calls == lifecycle[1:] + [("generate",), ("release", None)]  # resynced before generating
    assert double.offloaded == {"weights", "kv_cache", "cuda_graph"}


def test_vllm_call_order_through_the_client(runtime, tiny_dirs, monkeypatch):
    double = RecordingVLLMDouble()
    monkeypatch.setattr(VLLMEngine, "launch", classmethod(lambda cls, d, p, dev: cls(llm=double, tp_size=p.tp)))
    client = RolloutClient(EngineSettings(engine="vllm"), tiny_dirs["a"])
    client.sync(runtime)
    k = len(double.buckets)
    assert k >= 1  # the default 512 MiB bucket holds the whole tiny model
    assert double.calls == ([("sleep", 2), ("wake_up", ("weights",))] + [("load_weights",)] * k
                            + [("wake_up", ("kv_cache",)), ("reset_prefix_cache",)])


# ---- two ranks, one engine, a gloo wait --------------------------------------------------------


def _run_worker(tiny_dirs, out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--hf", str(tiny_dirs["a"]), "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    records = [out / f"rank{r}.pt" for r in (0, 1)]
    if not all(p.exists() for p in records):
        raise AssertionError(f"wait-group worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [torch.load(p, weights_only=False) for p in records]


def test_two_ranks_share_one_engine_and_wait_on_gloo(tiny_dirs, tmp_path):
    leader, waiter = _run_worker(tiny_dirs, tmp_path, "--delay", "3", "--timeout", "60")
    assert "error" not in leader and "error" not in waiter, (leader.get("error"), waiter.get("error"))
    assert leader["has_engine"] and not waiter["has_engine"]
    assert leader["backend"] == waiter["backend"] == "gloo" and leader["group"] == waiter["group"] == [0, 1]
    assert [r[:2] for r in waiter["results"]] == [("rank1", 0), ("rank1", 1)]
    assert waiter["results"] == leader["leader_for_rank1"]  # generated by the leader, for rank 1's prompts
    assert [r[:2] for r in leader["results"]] == [("rank0", 0), ("rank0", 1)]


def test_a_wait_past_rollout_wait_timeout_fails_instead_of_hanging(tiny_dirs, tmp_path):
    _, waiter = _run_worker(tiny_dirs, tmp_path, "--delay", "12", "--timeout", "3")
    assert "error" in waiter and not waiter["has_engine"]
    assert "timed out" in waiter["error"].lower() or "timeout" in waiter["error"].lower(), waiter["error"]
