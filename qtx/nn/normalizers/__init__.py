"""Attention normalizers: pure functions over attention scores, plus a registry of plug-ins.

Every normalizer maps scores `x` (any shape, normalised along `axis`) and an optional boolean mask
`where` (True = attend, broadcastable to `x`) to attention weights of the same shape. Masked
entries are exactly 0 and a fully masked row is all zeros (never NaN). Computation happens in
float32 and the result is cast back to the input dtype.

- softmax (`softmax.py`): the usual normalised exponential.
- clipped_softmax (`clipped_softmax.py`): Bondarenko et al. 2023, eq. 4.
- softplus (`softplus.py`): softplus attention with re-weighting (Gao & Spratling 2025).

Each is one module of this package that registers a `Spec` (`base.py`: its config keys and
defaults, validation, optional Pallas support) and lists its public functions in `__all__`; the
package imports every module it holds. A normalizer of your own needs no edit of qtx: a file of
yours calls `register(Spec(...))` and your config imports it (docs/extending.md, run as
written by the tests). Gated attention is not a normalizer: it multiplies the context of each
head (`qtx.nn.attention`), on top of any of these.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from qtx.nn.normalizers.base import (Normalizer, ParamError, Spec, all_params, get, names,
                                     register, spec)

__all__ = ["Normalizer", "ParamError", "Spec", "all_params", "get", "names", "register", "spec"]

# Every module of this package is a normalizer: importing it registers it, and the names in its
# __all__ become names of qtx.nn.normalizers (so a new normalizer is one new file).
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
  if _info.name != "base":
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
      globals()[_name] = getattr(_module, _name)
      __all__.append(_name)
