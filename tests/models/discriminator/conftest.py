"""An upcycled tiny discriminator checkpoint (routed, 4 experts, top-2) shared by the module's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def disc_ckpt(tiny_dirs, tmp_path_factory):
    from megatron_prism.models.discriminator import DiscriminatorSpec, upcycle_to_checkpoint

    out = tmp_path_factory.mktemp("disc") / "routed"
    # A non-zero seed and the default aux coefficient: the router is random, the head is random.
    return upcycle_to_checkpoint(tiny_dirs["a"], out, DiscriminatorSpec(experts=4, topk=2), seed=5)
