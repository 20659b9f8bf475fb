"""Triton kernels, each next to its pure-torch reference (as in Liger-Kernel).

fused_policy_loss     per-token log-ratio, clipped surrogate (PPO/GRPO/DAPO dual clip, GSPO
                      sequence ratio), KL term (k1/abs/k2/k3 and verl's straight-through k1+/abs+/k3+)
                      and masked reduction, with d loss / d logp written in the same pass;
                      ``policy_loss_reference`` beside it
fused_linear_logprob  hidden states x vocab-parallel output weight -> target log-prob (+ entropy),
                      chunked over tokens on the platform matmul with Triton row kernels for the
                      online log-sum-exp and the in-place logits gradient, never holding [T, V];
                      ``fused_linear_logprob_loss`` (6TVH single pass), ``linear_logprob_reference``
memtrack              peak memory counted from allocations (works on fake tensors: no compute)
bench                 timings against torch eager / torch.compile, memory at the benchmark shape
                      (``tools/bench_kernels.py``)

This package imports torch and triton only, so a kernel is usable and testable on its own. On a
CPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""
