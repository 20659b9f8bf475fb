"""Faults from outside on checkpoint files: bytes garbled in place (same size), truncation, an
edited step, invalid JSON, a deleted newest checkpoint, NaN weights, a full disk (a small tmpfs, and
a file-size limit set on a real child process). Each is refused in one line naming the file, or
passed over for the newest checkpoint that verifies, and nothing half-written is left behind."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_prism.config.schema import OptimizerConfig
from megatron_prism.models import build_policy
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.training import checkpoint as ckpt
from megatron_prism.training.optimizer import PolicyOptimizer
from megatron_prism.training.runtime import wrap_ddp

ROOT = Path(__file__).resolve().parents[2]


def _setup(source):
    model = build_policy(source)
    ddp = wrap_ddp([model], distributed_optimizer=True)[0]
    opt = PolicyOptimizer([ddp], OptimizerConfig(lr=1e-3), total_steps=8, bf16=False)
    return ddp, opt


def _save(root, step, ddp, opt, src, **kw):
    return ckpt.save_checkpoint(root, step, chunks=[ddp], hf_config=read_hf_config(src), hf_files_dir=src,
                                optimizer_state=opt.state_dict(),
                                trainer_state={"stage": "sft", "step": step, "loader": {}}, **kw)


def _garble(path: Path, seed: int) -> None:
    """Same-size random bytes in the middle of the file (a size check cannot see it)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    at = len(data) // 2
    data[at:at + 64] = bytes(rng.randrange(256) for _ in range(64))
    path.write_bytes(bytes(data))


@pytest.fixture()
def two_checkpoints(tiny_dirs, tmp_path):
    src = tiny_dirs["b"]
    ddp, opt = _setup(src)
    root = tmp_path / "ck"
    return root, _save(root, 1, ddp, opt, src), _save(root, 2, ddp, opt, src)


def test_complete_json_records_sha256_of_every_file(two_checkpoints):
    _, _, newest = two_checkpoints
    files = json.loads((newest / ckpt.COMPLETE).read_text())["files"]
    on_disk = {str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()} - {ckpt.COMPLETE}
    assert set(files) == on_disk  # hf/ included
    for name, d in files.items():
        assert d["sha256"] == hashlib.sha256((newest / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("victim", ["mp_rank_00_000.safetensors", "rank_00000.pt", "hf/config.json"])
def test_garbled_file_is_named_and_passed_over(two_checkpoints, victim, capsys):
    root, first, newest = two_checkpoints
    _garble(newest / victim, seed=len(victim))
    with pytest.raises(CheckpointError, match=rf"{victim}: sha256 .* the file is damaged"):
        ckpt.verify_checkpoint(newest, 1)
    assert ckpt.newest_verified(root) == first
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "step_00000002 does not verify, passed over" in out[0] and victim in out[0]


def test_garbled_rank_file_without_digest_is_one_line(two_checkpoints):
    # An older COMPLETE.json (sizes only): the torch archive itself is then what fails, still named.
    _, _, newest = two_checkpoints
    complete = json.loads((newest / ckpt.COMPLETE).read_text())
    complete["files"] = {n: d["bytes"] for n, d in complete["files"].items()}
    (newest / ckpt.COMPLETE).write_text(json.dumps(complete))
    rank = newest / "rank_00000.pt"
    rank.write_bytes(os.urandom(rank.stat().st_size))
    with pytest.raises(CheckpointError, match=r"rank_00000.pt: cannot be read .* the file is damaged") as info:
        ckpt.load_checkpoint(newest)
    assert "\n" not in str(info.value)


def _rewrite_with_digest(ckpt_dir: Path, name: str, text: str) -> None:
    """An operator's edit that also fixes COMPLETE.json's digest (so only the content is wrong)."""
    (ckpt_dir / name).write_text(text)
    complete = json.loads((ckpt_dir / ckpt.COMPLETE).read_text())
    data = (ckpt_dir / name).read_bytes()
    complete["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / ckpt.COMPLETE).write_text(json.dumps(complete))


def test_edited_step_and_invalid_json_are_refused(two_checkpoints):
    root, first, newest = two_checkpoints
    state = json.loads((newest / ckpt.TRAINER_STATE).read_text())
    _rewrite_with_digest(newest, ckpt.TRAINER_STATE, json.dumps({**state, "step": 7}))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: step 7 disagrees"):
        ckpt.verify_checkpoint(newest, 1)
    _rewrite_with_digest(newest, ckpt.TRAINER_STATE, "{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: not valid JSON"):
        ckpt.verify_checkpoint(newest, 1)
    (newest / ckpt.COMPLETE).write_text("{")
    with pytest.raises(CheckpointError, match=r"COMPLETE.json: not valid JSON"):
        ckpt.verify_checkpoint(newest, 1)
    assert ckpt.newest_verified(root) == first


def test_deleting_the_newest_as_advised_resumes_from_the_previous(two_checkpoints):
    root, first, newest = two_checkpoints
    shard = newest / "mp_rank_00_000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        ckpt.verify_checkpoint(newest, 1)
    shutil.rmtree(newest)  # what the message advises; `latest` now names a directory that is gone
    assert (root / ckpt.LATEST).read_text().strip() == newest.name
    assert ckpt.latest_checkpoint(root) == first and ckpt.newest_verified(root) == first


def test_resume_repoints_a_stale_latest(two_checkpoints):
    """What a SIGKILL between a save's rename and its ``latest`` update leaves (seen in the random-
    kill suite at the stage's last step): step 2 complete, ``latest`` still naming step 1, a stray
    ``latest.tmp``. The resume takes step 2 and ``latest`` names it again, even though a stage
    resumed at its last step saves nothing more."""
    root, first, newest = two_checkpoints
    (root / ckpt.LATEST).write_text(first.name + "\n")
    (root / (ckpt.LATEST + ".tmp")).write_text(newest.name[:5])  # a half-written pointer
    assert ckpt.choose_resume(root) == newest
    assert (root / ckpt.LATEST).read_text().strip() == newest.name
    assert not (root / (ckpt.LATEST + ".tmp")).exists()
    assert ckpt.choose_resume(root, resume_from=first) == first
    assert (root / ckpt.LATEST).read_text().strip() == first.name


def test_none_verifies_is_one_line(two_checkpoints):
    root, first, newest = two_checkpoints
    for d in (first, newest):
        _garble(d / "mp_rank_00_000.safetensors", seed=3)
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints verifies") as info:
        ckpt.newest_verified(root, say=lambda *a, **k: None)
    assert "\n" not in str(info.value)


def test_nan_weights_are_never_saved(tiny_dirs, tmp_path):
    src = tiny_dirs["b"]
    ddp, opt = _setup(src)
    first = _save(tmp_path / "ck", 1, ddp, opt, src)
    with torch.no_grad():
        next(ddp.module.parameters())[0].fill_(float("nan"))
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=r"step 2 not written: the weights hold NaN/inf; .*step_00000001 "
                                                        r"is intact"):
        _save(tmp_path / "ck", 2, ddp, opt, src)
    assert ckpt.newest_verified(tmp_path / "ck") == first
    assert not list((tmp_path / "ck").glob(".tmp-*")) and not (tmp_path / "ck" / "step_00000002").exists()


def test_nan_discriminator_weights_are_never_saved(tiny_dirs, tmp_path):
    from megatron_prism.models.discriminator import DiscriminatorSpec, build_discriminator, upcycle_to_checkpoint
    from megatron_prism.models.discriminator.parts import PartFinder
    from megatron_prism.training.discriminator_runtime import DiscriminatorRuntime

    source = upcycle_to_checkpoint(tiny_dirs["a"], tmp_path / "routed", DiscriminatorSpec(experts=4, topk=2), seed=5)
    model = build_discriminator(source, seed=5)
    chunks = wrap_ddp([model], distributed_optimizer=True)
    disc = DiscriminatorRuntime(chunks, model.hf_config, model.spec, PartFinder([b""] * 256), 0, 1,
                                PolicyOptimizer(chunks, OptimizerConfig(lr=1e-3), total_steps=2, bf16=False))
    root = tmp_path / "disc_ck"
    from megatron_prism.training import integrity

    read_back = []
    real_digest = integrity.file_digest
    integrity.file_digest = lambda path: read_back.append(Path(path).name) or real_digest(path)
    try:
        first = disc.save(root, 1, {"stage": "warmup"})
    finally:
        integrity.file_digest = real_digest
    # the weights and rank files are hashed while written, never read back; what COMPLETE.json
    # says of them is what is on disk
    assert read_back and not [n for n in read_back if n.endswith((".safetensors", ".pt"))], read_back
    files = json.loads((first / ckpt.COMPLETE).read_text())["files"]
    shard = next(n for n in files if n.startswith("model/mp_rank_"))
    assert files[shard]["sha256"] == hashlib.sha256((first / shard).read_bytes()).hexdigest()
    assert disc.healthy()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    assert not disc.healthy()
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=r"discriminator checkpoint at step 2 not written: the weights "
                                                        r"hold NaN/inf; .*step_00000001 is intact"):
        disc.save(root, 2, {"stage": "warmup"})
    assert ckpt.newest_verified(root) == first and not (root / "step_00000002").exists()


# A real child process saves checkpoints until the disk (or its file-size limit) is full.
SAVER = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from megatron_prism.parallel.state import init_parallel
    init_parallel()
    sys.path.insert(0, sys.argv[3])
    from test_checkpoint_files import _save, _setup
    from megatron_prism.training import checkpoint as ckpt
    src, root, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[4])
    ddp, opt = _setup(src)
    _save(root, 1, ddp, opt, src)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        _save(root, 2, ddp, opt, src)
    except ckpt.CheckpointWriteError as exc:
        print("REFUSED", exc)
        sys.exit(0)
    print("SAVED")
""")


def _saver(src: Path, root: Path, limit: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SAVER, str(src), str(root), str(Path(__file__).parent), str(limit)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _check_disk_full_outcome(line: str, root: Path) -> None:
    assert line.startswith("REFUSED checkpoint at step 2 could not be"), line
    assert "step_00000001 is intact" in line
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000002").exists()
    assert ckpt.newest_verified(root, say=lambda *a, **k: None) == root / "step_00000001"


def test_file_size_limit_mid_write(tiny_dirs, tmp_path):
    """RLIMIT_FSIZE on the saving process: the shard's write itself fails (EFBIG), past the free-space check."""
    _check_disk_full_outcome(_saver(tiny_dirs["b"], tmp_path / "ck", limit=64 << 10), tmp_path / "ck")


def test_full_tmpfs(tiny_dirs, tmp_path):
    """A tmpfs with room for one checkpoint and a half: the second save fails, the first stays whole."""
    src = tiny_dirs["b"]
    probe = tmp_path / "probe"
    ddp, opt = _setup(src)
    size = sum(p.stat().st_size for p in _save(probe, 1, ddp, opt, src).rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    # CI runs as root (as the real-Slurm test needs): a machine that cannot mount is a failure, not a skip
    assert mount.returncode == 0, f"cannot mount a tmpfs (run the suite as root): {mount.stderr.strip()}"
    try:
        _check_disk_full_outcome(_saver(src, mnt / "ck", limit=0), mnt / "ck")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_resume_from_an_older_checkpoint(two_checkpoints):
    root, first, newest = two_checkpoints
    assert ckpt.choose_resume(root) == newest
    assert ckpt.choose_resume(root, resume_from=first) == first
    assert ckpt.set_aside_newer(first) == [root / "discarded-step_00000002"]
    assert ckpt.newest_verified(root) == first  # the abandoned line is never resumed from
    _garble(first / "rank_00000.pt", seed=5)
    with pytest.raises(CheckpointError, match="rank_00000.pt: sha256"):
        ckpt.choose_resume(root, resume_from=first)


def test_resume_from_a_missing_directory_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_prism.cli", "run", str(ROOT / "examples/configs/tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}", "run.logger=none", "--resume-from",
                           str(tmp_path / "nowhere" / "step_00000003")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    missing = tmp_path / "nowhere" / "step_00000003"
    assert proc.stderr.strip().splitlines()[-1] == f"prism: error: --resume-from {missing}: no such checkpoint directory"
    assert "Traceback" not in proc.stderr
