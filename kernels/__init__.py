"""Triton kernels, each next to its pure-torch reference (as in Liger-Kernel).

fused_policy_loss     per-token log-ratio, clipped surrogate (PPO/GRPO/DAPO dual clip, GSPO
                      sequence ratio), KL term and masked reduction, with d loss / d logp written
                      in the same pass; ``policy_loss_reference`` beside it
fused_linear_logprob  hidden states x vocab-parallel output weight -> target log-prob (+ entropy)
                      with an online log-sum-exp, never materialising [T, V] logits;
                      ``linear_logprob_reference`` beside it
bench                 timings against torch eager / torch.compile (``tools/bench_kernels.py``)

This package imports torch and triton only, so a kernel is usable and testable on its own. On a
CPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""
