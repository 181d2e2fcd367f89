"""Pallas kernels: the two-pass softmax and the two-pass (clipped-softmax) attention.

- two_pass_softmax(x, axis=-1, where=None, gamma=None, zeta=1.0, interpret=None)
- logsumexp(x, axis=-1, interpret=None)
- two_pass_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, causal=False, key_mask_BxS=None,
                     gamma=None, zeta=1.0, scale=None, interpret=None)

All are differentiable (jax.custom_vjp over backward Pallas kernels) and run compiled on GPU
(Pallas Triton) and TPU (Mosaic), interpreted on CPU. `reference` holds the pure-jnp versions.
"""
from qtx.kernels import reference
from qtx.kernels.attention import two_pass_attention
from qtx.kernels.softmax import logsumexp, two_pass_softmax

__all__ = ["reference", "two_pass_attention", "two_pass_softmax", "logsumexp"]
