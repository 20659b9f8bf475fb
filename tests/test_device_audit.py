"""The device audit: the training path run with the model on a (virtual, see tests/cuda_audit.py)
``cuda:0`` and every collective checked against its group's backend, as a one-GPU NCCL job runs.

Each case is the project's own call sequence with host-built inputs, as the stages make them:
an SFT micro-batch forward + backward, an RLVR policy update (loss through the fused head's torch
path) with its optimizer step, a discriminator score and train step, the checkpoint save, and the
weight export of a sync. On a machine with CUDA the same tests run on the real GPU
(tools/gpu_smoke.sh), where CUDA and NCCL check everything themselves.

Gaps (megatron-core pieces the audit runs through but whose CUDA-only branches it cannot take):
megatron's own gradient clipping and distributed optimizer are chosen by ``cpu_compat.on_cpu()``
(the plain optimizer and the project's clipping run here); the gradient-norm and optimizer step
run megatron's local (no apex / Transformer Engine) multi-tensor fallbacks; pipeline p2p is not
exercised (one rank). What the audit covers of them is that their tensors and collectives sit on
the right device.
"""

from __future__ import annotations

import pytest
import torch

import cuda_audit
from megatron_prism.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, PrismConfig
from megatron_prism.models.qwen3vl.tiny import TOKENS

IMG, VS, VE = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
PATCH_DIM = 3 * 2 * 4 * 4  # tiny vision tower: 3 channels x temporal 2 x patch 4 x 4


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    from megatron_prism.parallel import init_parallel

    init_parallel(tp=1, pp=1)


def _prompt(gen: torch.Generator, image: bool) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    ids = torch.randint(0, 200, (3,), generator=gen).tolist()
    if not image:
        return ids, None, None
    thw = torch.tensor([[1, 4, 4]])
    ids += [VS] + [IMG] * 4 + [VE] + torch.randint(0, 200, (2,), generator=gen).tolist()
    return ids, torch.randn(16, PATCH_DIM, generator=gen), thw


def _policy(source, dtype: str = "float32", trainable: bool = True):
    from megatron_prism.training.runtime import PolicyRuntime

    return PolicyRuntime.build(source, ModelConfig(dtype=dtype), ParallelConfig(), OptimizerConfig(lr=1e-3),
                               total_steps=4, seed=3, trainable=trainable, head_backend="torch")


def _params_on_gpu(audit, chunks) -> None:
    off = [n for c in chunks for n, p in c.named_parameters() if not audit.on_gpu(p)]
    assert not off, f"parameters left on the host: {off[:5]}"


def _sft_micro_batch(seed: int = 0):
    """One packed SFT row as sft._rows_to_micro_batches makes it: host tensors."""
    from megatron_prism.training.runtime import MicroBatch

    gen = torch.Generator().manual_seed(seed)
    ids, pix, thw = _prompt(gen, image=True)
    ids += torch.randint(0, 200, (20 - len(ids),), generator=gen).tolist()
    input_ids = torch.tensor([ids])
    targets = torch.full_like(input_ids, -100)
    targets[:, 12:-1] = input_ids[:, 13:]
    return MicroBatch({"input_ids": input_ids, "targets": targets, "attention_mask": torch.ones_like(input_ids),
                       "position_ids": None, "pixel_values": pix, "image_grid_thw": thw},
                      num_tokens=int((targets != -100).sum()))


# "b" (vocab 320, tied) holds a padded vocabulary (384 rows): the padding path is audited too
@pytest.mark.parametrize("variant", ["a", "b"])
def test_device_audit_sft_micro_batch_forward_backward(tiny_dirs, variant):
    from megatron_prism.algorithms.aggregation import GlobalCounts, aggregate
    from megatron_prism.stages import sft

    with cuda_audit.audit() as audit:
        rt = _policy(tiny_dirs[variant])
        _params_on_gpu(audit, rt.chunks)
        mbs = [_sft_micro_batch(0), _sft_micro_batch(1)]
        counts = GlobalCounts(tokens=sft._global_tokens(mbs), seqs=1.0)

        def loss_fn(out, tensors):
            mask = tensors["targets"] != -100
            loss = aggregate(-out.logp, mask, "token-mean", counts)
            return loss, {"nll_share": float(loss.detach())}

        rt.train()
        rt.optimizer.zero_grad()
        reduced = rt.run(mbs, loss_fn)
        grads = [p.main_grad for c in rt.chunks for p in c.parameters() if getattr(p, "main_grad", None) is not None]
        assert grads and all(audit.on_gpu(g) for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert len(reduced) == 2 and all(torch.isfinite(torch.tensor(r["nll_share"])) for r in reduced)
    # the DP token count is host bookkeeping: over the host (gloo) group, on the host
    assert ("all_reduce", "gloo", "cpu") in audit.collectives or torch.cuda.is_available()


def _rl_samples(n: int = 4) -> list[dict]:
    from megatron_prism.rollout import GenerationRequest, GenerationResult

    gen = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids, pix, thw = _prompt(gen, image=i % 2 == 0)
        response = torch.randint(0, 200, (5 + i,), generator=gen).tolist()
        out.append({"request": GenerationRequest(ids, pix, thw, f"r{i}"),
                    "result": GenerationResult(f"r{i}", 0, response, [-1.0] * len(response), "stop"),
                    "advantage": float(i) - 1.5})
    return out


def test_device_audit_rlvr_policy_update(tiny_dirs):
    from megatron_prism.stages.policy_update import update_policy
    from megatron_prism.training.loop import Throughput

    cfg = PrismConfig()
    cfg.algorithm.loss_backend = "torch"
    cfg.algorithm.ppo_epochs = 2  # off-policy: old log-probs by a forward-only pass, then two updates
    cfg.parallel.micro_batch_size = 2
    with cuda_audit.audit() as audit:
        rt = _policy(tiny_dirs["a"])
        before = {n: p.detach().clone() for n, p in rt.chunks[0].named_parameters()}
        metrics, result = update_policy(cfg, rt, _rl_samples(), None, Throughput(), pause="audit.update")
        assert result.updated and torch.isfinite(torch.tensor(result.grad_norm))
        moved = [n for n, p in rt.chunks[0].named_parameters() if not torch.equal(before[n], p.detach())]
        assert moved, "the optimizer step changed no parameter"
        _params_on_gpu(audit, rt.chunks)
    assert torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.fixture(scope="module")
def disc_source(tiny_dirs, tmp_path_factory):
    from megatron_prism.models.discriminator import DiscriminatorSpec, upcycle_to_checkpoint

    return upcycle_to_checkpoint(tiny_dirs["a"], tmp_path_factory.mktemp("audit_disc") / "routed",
                                 DiscriminatorSpec(experts=4, topk=2), seed=5)


def _score_items(seed: int, n: int):
    from megatron_prism.models.discriminator.batch import ScoreItem

    cap, cap_, think, think_, ans, ans_, space, im_end = range(240, 248)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids, pix, thw = _prompt(gen, image=i % 2 == 0)
        words = torch.randint(0, 200, (6,), generator=gen).tolist()
        rows.append(ScoreItem(ids, [cap, *words[:2], cap_, space, think, *words[2:5], think_, ans, words[5], ans_,
                                    im_end], pix, thw))
    return rows


def test_device_audit_discriminator_score_train_step_and_save(disc_source, tmp_path):
    from megatron_prism.models.discriminator import build_discriminator
    from megatron_prism.models.discriminator.parts import PartFinder
    from megatron_prism.training.discriminator_runtime import DiscriminatorRuntime
    from megatron_prism.training.optimizer import PolicyOptimizer
    from megatron_prism.training.runtime import wrap_ddp

    table = [bytes([97 + i % 26]) for i in range(240)]
    table += [b"<caption>", b"</caption>", b"<think>", b"</think>", b"<answer>", b"</answer>", b" ", b""]
    table += [b""] * (256 - len(table))
    # megatron keeps the MoE aux-loss scale in a class attribute, shaped by the first stage that set
    # it in this process (another test's); a fresh process starts with none
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    with cuda_audit.audit() as audit:
        model = build_discriminator(disc_source, seed=5)
        chunks = wrap_ddp([model], distributed_optimizer=True)
        opt = PolicyOptimizer(chunks, OptimizerConfig(lr=1e-3), total_steps=2, bf16=False)
        rt = DiscriminatorRuntime(chunks, model.hf_config, model.spec, PartFinder(table), 0, 1, opt)
        _params_on_gpu(audit, rt.chunks)
        batches = rt.pair_batches(_score_items(1, 2), _score_items(2, 2), 2)
        scores = rt.score(batches)
        assert scores[0].shape == (4, 2) and torch.isfinite(scores[0]).all()

        def bt_loss(teacher, policy, valid):
            loss = -torch.nn.functional.logsigmoid(teacher - policy).mean()
            return loss, {"loss": float(loss.detach())}

        result, reduced = rt.train_step(batches, bt_loss, aux_loss=True)
        assert result.updated
        stats = rt.load_balance()
        # the checkpoint: health flag, weights hashed while written, the distributed optimizer's
        # parameter state gathered, digests gathered (host groups)
        assert rt.healthy()
        saved = rt.save(tmp_path / "disc_ck", 1, {"stage": "warmup"})
    assert stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    from megatron_prism.training.checkpoint import verify_checkpoint

    verify_checkpoint(saved, 1)
    state = torch.load(saved / "rank_00000.pt", weights_only=True)
    assert state["optimizer"]["parameter_state"][0] is not None


def test_device_audit_checkpoint_save(tiny_dirs, tmp_path):
    from megatron_prism.training.checkpoint import load_checkpoint, save_checkpoint

    with cuda_audit.audit() as audit:
        rt = _policy(tiny_dirs["a"])
        rt.optimizer.zero_grad()
        rt.run([_sft_micro_batch(0)], lambda out, t: ((-out.logp).sum() / 10, {}))
        rt.optimizer.step()
        path = save_checkpoint(tmp_path / "ckpt", 1, chunks=rt.chunks, hf_config=rt.hf_config,
                               hf_files_dir=tiny_dirs["a"], optimizer_state=rt.optimizer.state_dict(),
                               trainer_state={"stage": "sft", "step": 1})
        # (on a real GPU the harness records nothing: NCCL itself refuses host tensors there)
        assert audit.collectives or torch.cuda.is_available(), "the save made no collective"
    loaded = load_checkpoint(path)
    assert loaded.trainer_state["step"] == 1


def test_device_audit_weight_export_for_sync(tiny_dirs):
    from megatron_prism.rollout.weight_sync import bucketize, export_hf_weights, flatten

    with cuda_audit.audit() as audit:
        rt = _policy(tiny_dirs["a"], trainable=False)
        named = [(n, t.detach().clone()) for n, t in export_hf_weights(rt.chunks, rt.hf_config, dst_rank_only=True)]
        assert named and all(audit.on_gpu(t) for _, t in named)
        buckets = list(bucketize(named, 1 << 16))
        flat = flatten(buckets[0])
        assert audit.on_gpu(flat.buffer) if hasattr(flat, "buffer") else True
        names = [n for n, _ in flat.unflatten()]
    assert names == [n for n, _ in buckets[0]]


def test_device_audit_harness_raises_the_gpu_error_on_a_mix():
    """The harness itself: a host operand next to a GPU one fails as on CUDA; moved, it passes."""
    with cuda_audit.audit() as audit:
        w = torch.nn.Embedding(10, 4).to("cuda")
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            w(torch.tensor([1, 2]))
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            torch.cat([w.weight, torch.zeros(1, 4)])
        out = w(torch.tensor([1, 2]).to(w.weight.device, non_blocking=True))
        out.sum().backward()
        assert audit.on_gpu(w.weight.grad) and out.device.type == "cuda"
        import torch.distributed as dist

        with pytest.raises((RuntimeError, ValueError), match="nccl communicates CUDA|No backend type associated"):
            dist.all_reduce(torch.ones(1))


def test_device_audit_no_cuda_literal_outside_the_parallel_package():
    """Device choices live in megatron_prism/parallel (compute_device / comm_device): nowhere else
    may the package say ``.cuda()`` or ``device="cuda"``."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "megatron_prism"
    pattern = re.compile(r"""\.cuda\(|device\s*=\s*["']cuda""")
    found = [f"{p.relative_to(root.parent)}:{i}: {line.strip()}"
             for p in sorted(root.rglob("*.py")) if "parallel" not in p.relative_to(root).parts[:1]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "CUDA named outside megatron_prism/parallel:\n" + "\n".join(found)


def test_device_audit_comm_device_follows_the_backend():
    """NCCL groups communicate on the GPU, the host groups on the host, whatever the machine."""
    import torch.distributed as dist

    from megatron_prism.parallel import devices

    with cuda_audit.audit():
        assert devices.comm_device().type == "cuda"  # the default group of a GPU job is NCCL
        for kind in devices.HOST_GROUP_KINDS:
            group = devices.host_group(kind)
            assert dist.get_backend(group) == "gloo" and devices.comm_device(group) == torch.device("cpu")
        with pytest.raises(ValueError, match="unknown host group 'tp'"):
            devices.host_group("tp")
