"""The PRISM discriminator on megatron-core: upcycled MoE Qwen3-VL, score head, part scoring.

spec.py        DiscriminatorSpec (mode, experts, top-k, aux loss, router noise), the MoE layer spec
router.py      PartAwareRouter: megatron's TopKRouter + per-token parts (dedicated groups, load stats)
model.py       Qwen3VLDiscriminator: the policy backbone without LM head + score head -> [b, 2]
mapping.py     parameter names/shapes (experts, router, head) for the reshardable checkpoint format
upcycle.py     dense MLP -> experts (+ PRISM's expert noise), router/head init
load_balance.py PRISM's (HF's) load-balancing coefficient -> megatron's per-layer one
manifest.py    what marks a checkpoint as a discriminator (its manifest block)
checkpoint.py  open / write (upcycle) / save (from a trained model) discriminator checkpoints
build.py       build_discriminator
parts.py       caption / think+answer boundaries from token ids (PartFinder)
batch.py       ScoreItem rows -> ScoreBatch (3-D MRoPE positions, part labels, score positions)
"""

from megatron_prism.models.discriminator.batch import ScoreBatch, ScoreItem, VisionTokens, make_score_batch
from megatron_prism.models.discriminator.build import build_discriminator
from megatron_prism.models.discriminator.checkpoint import save_discriminator, upcycle_to_checkpoint
from megatron_prism.models.discriminator.manifest import is_discriminator_checkpoint
from megatron_prism.models.discriminator.model import Qwen3VLDiscriminator
from megatron_prism.models.discriminator.parts import PartFinder, ResponseParts
from megatron_prism.models.discriminator.spec import MODES, DiscriminatorSpec

__all__ = [
    "MODES", "DiscriminatorSpec", "PartFinder", "Qwen3VLDiscriminator", "ResponseParts", "ScoreBatch",
    "ScoreItem", "VisionTokens", "build_discriminator", "is_discriminator_checkpoint", "make_score_batch",
    "save_discriminator", "upcycle_to_checkpoint",
]
