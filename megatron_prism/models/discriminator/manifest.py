"""What marks a checkpoint as a discriminator: the ``discriminator`` block of its manifest.

Kept apart from ``checkpoint`` (which reads and writes them) so that ``upcycle`` can refuse a
discriminator as a backbone without importing the module that imports it (no import circle).
"""

from __future__ import annotations

from pathlib import Path

from megatron_prism.models.conversion import megatron_format as mf

BLOCK = "discriminator"


def is_discriminator_checkpoint(path: str | Path) -> bool:
    return mf.is_megatron_checkpoint(path) and BLOCK in mf.read_manifest(path)
