"""Checkpoint save/load: exact continuation, refusal of damaged checkpoints, failed writes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from megatron_prism.config.schema import OptimizerConfig
from megatron_prism.models import build_policy
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.training import checkpoint as ckpt
from megatron_prism.training.optimizer import PolicyOptimizer
from megatron_prism.training.runtime import wrap_ddp


def _setup(source):
    model = build_policy(source)
    ddp = wrap_ddp([model], distributed_optimizer=True)[0]
    opt = PolicyOptimizer([ddp], OptimizerConfig(lr=1e-3, clip_grad=0.1, warmup_steps=1, schedule="cosine"),
                          total_steps=8, bf16=False)
    return ddp, opt


def _step(ddp, opt):
    # The batch is drawn from the RNGs, so a restored RNG state is part of what is checked.
    ids = torch.randint(0, 240, (2, 12))
    noise = float(np.random.rand()) + random.random()
    opt.zero_grad()
    loss = ddp(ids).float().log_softmax(-1)[..., 0].mean() * (1 + noise)
    loss.backward()
    return opt.step()


def _params(ddp):
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def _save(root, step, ddp, opt, src, **kw):
    return ckpt.save_checkpoint(root, step, chunks=[ddp], hf_config=read_hf_config(src), hf_files_dir=src,
                                optimizer_state=opt.state_dict(), trainer_state={"stage": "sft", "step": step}, **kw)


def test_resume_continues_bit_exactly(tiny_dirs, tmp_path):
    src = tiny_dirs["a"]
    torch.manual_seed(0)
    ddp, opt = _setup(src)
    for _ in range(2):
        _step(ddp, opt)
    path = _save(tmp_path / "ck", 2, ddp, opt, src)
    for _ in range(3):
        _step(ddp, opt)
    expected = _params(ddp)

    torch.manual_seed(123)  # anything: the checkpoint must restore every RNG
    random.seed(5)
    np.random.seed(5)
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ck"))
    assert loaded.path == path and loaded.trainer_state == {"stage": "sft", "step": 2}
    ddp2, opt2 = _setup(path)  # model weights from the checkpoint's megatron shards
    opt2.load_state_dict(loaded.rank_state["optimizer"])
    ckpt.set_rng_state(loaded.rank_state["rng"])
    for _ in range(3):
        _step(ddp2, opt2)
    got = _params(ddp2)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_damaged_checkpoints_are_refused(tiny_dirs, tmp_path):
    src = tiny_dirs["b"]
    ddp, opt = _setup(src)
    path = _save(tmp_path / "ck", 1, ddp, opt, src)
    shard = next(path.glob("mp_rank_*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        ckpt.load_checkpoint(path)
    shard.write_bytes(data)
    complete = json.loads((path / ckpt.COMPLETE).read_text())
    (path / ckpt.COMPLETE).write_text(json.dumps({**complete, "world_size": 4}))
    with pytest.raises(CheckpointError, match="written by 4 ranks"):
        ckpt.load_checkpoint(path)
    (path / ckpt.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    src = tiny_dirs["b"]
    ddp, opt = _setup(src)
    first = _save(tmp_path / "ck", 1, ddp, opt, src)

    def disk_full(*args, **kwargs):  # what safetensors raises on a full disk (not an OSError)
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    # The real disk-full paths are in tests/faults; this one checks a non-OSError writer error.
    monkeypatch.setattr(ckpt, "write_safetensors", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step 2 .*No space left.*step_00000001 is intact"):
        _save(tmp_path / "ck", 2, ddp, opt, src)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path / "ck") == first
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    ckpt.load_checkpoint(first)  # still whole


def test_only_the_last_n_are_kept(tiny_dirs, tmp_path):
    src = tiny_dirs["b"]
    ddp, opt = _setup(src)
    for step in range(1, 5):
        _save(tmp_path / "ck", step, ddp, opt, src, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert ckpt.latest_checkpoint(tmp_path / "ck").name == "step_00000004"
