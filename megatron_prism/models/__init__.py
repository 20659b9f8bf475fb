"""Models on megatron-core. ``build_policy`` builds the Qwen3-VL policy from a HF directory;
``build_discriminator`` the PRISM discriminator from a discriminator checkpoint."""

from __future__ import annotations


def build_policy(*args, **kwargs):
    """See :func:`megatron_prism.models.qwen3vl.build.build_policy`."""
    from megatron_prism.models.qwen3vl.build import build_policy as _build

    return _build(*args, **kwargs)


def build_discriminator(*args, **kwargs):
    """See :func:`megatron_prism.models.discriminator.build.build_discriminator`."""
    from megatron_prism.models.discriminator.build import build_discriminator as _build

    return _build(*args, **kwargs)


__all__ = ["build_discriminator", "build_policy"]
