"""Shared trainer parts: optimizer + LR schedule + clipping + NaN guard, checkpoints with exact resume.

Stages (``megatron_prism.stages``) are thin modules over these parts.
"""
