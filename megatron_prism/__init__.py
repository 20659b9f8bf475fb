"""megatron_prism: PRISM post-training (SFT -> black-box on-policy distillation -> RLVR) for
Qwen3-VL on megatron-core.

Importing the package pulls in no GPU-only dependency; heavy modules are imported where used.
"""

__version__ = "0.1.0"
