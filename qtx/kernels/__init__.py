"""Pallas kernels: the two-pass softmax and the two-pass attention (softmax, clipped softmax,
softmax with a sink logit, softplus attention with re-weighting).

- two_pass_softmax(x, axis=-1, where=None, gamma=None, zeta=1.0, interpret=None)
- logsumexp(x, axis=-1, interpret=None)
- two_pass_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, causal=False, key_mask_BxS=None,
                     gamma=None, zeta=1.0, sink=None, softplus_p=None, softplus_eps=1e-6,
                     scale=None, interpret=None)

All are differentiable (jax.custom_vjp over backward Pallas kernels) and run compiled on GPU
(Pallas Triton) and TPU (Mosaic), interpreted on CPU; under a mesh (jax.set_mesh) each device
runs them on its own batch and head shard (`sharding`); under a plain jax.jit whose inputs carry
NamedShardings, on the mesh of those shardings. Each pallas_call carries a pl.CostEstimate, so
the compiler's cost analysis counts the kernels' work. They lay themselves out for the platform
of the devices they are compiled for (`platforms`); `with qtx.kernels.target("gpu"):` picks one
for lowering with jax.export for a platform this host lacks. `reference` holds pure-jnp
versions.
"""
from qtx.kernels import reference
from qtx.kernels.attention import two_pass_attention
from qtx.kernels.softmax import NORMALIZER_ARGS as SOFTMAX_NORMALIZER_ARGS
from qtx.kernels.softmax import logsumexp, two_pass_softmax
from qtx.kernels.platforms import target

__all__ = ["reference", "two_pass_attention", "two_pass_softmax", "logsumexp",
           "SOFTMAX_NORMALIZER_ARGS", "target"]
