"""Attention normalizers: pure functions over attention scores, plus a registry of plug-ins.

Every normalizer maps scores `x` (any shape, normalised along `axis`) and an optional boolean mask
`where` (True = attend, broadcastable to `x`) to attention weights of the same shape. Masked
entries are exactly 0 and a fully masked row is all zeros (never NaN). Computation happens in
float32 and the result is cast back to the input dtype.

- softmax (`softmax.py`): the usual normalised exponential.
- clipped_softmax (`clipped_softmax.py`): Bondarenko et al. 2023, eq. 4.
- softplus (`softplus.py`): softplus attention with re-weighting (Gao & Spratling 2025).

Each is one module that registers a `Spec` (`base.py`: its config keys and defaults, validation,
optional Pallas support); docs/extending.md shows how to add one. Gated attention is not a
normalizer: it multiplies the context of each head (`qtx.nn.attention`), on top of any of these.
"""
from qtx.nn.normalizers.base import Normalizer, Spec, all_params, get, names, register, spec
from qtx.nn.normalizers.softmax import softmax
from qtx.nn.normalizers.clipped_softmax import clipped_softmax
from qtx.nn.normalizers.softplus import plain_softplus_reweight, softplus_reweight

__all__ = ["Normalizer", "Spec", "all_params", "get", "names", "register", "spec", "softmax",
           "clipped_softmax", "softplus_reweight", "plain_softplus_reweight"]
