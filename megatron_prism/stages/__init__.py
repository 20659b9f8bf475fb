"""The pipeline's stages, each a thin module over ``training`` and ``stages.common``:
``sft``, ``rlvr`` (GRPO/DAPO/GSPO by config), ``evaluate``; issue 7 adds the discriminator stages."""
