"""What a normalizer is to the attention module, and the registry of normalizers.

A normalizer plug-in is one module that defines its function(s) and calls `register(Spec(...))`:

  name       the value of `attention.normalizer`
  params     the attention config keys it reads, with their defaults (the single place these
             defaults are written; `qtx.config_lib` builds the config block from them)
  factory    factory(**kwargs) -> Normalizer, the public `get(name, **kwargs)`
  from_config(values, step) -> Normalizer: the normalizer of an attention config (values holds
             every key of `params`), at training step `step` (None outside training); its
             `learned` field names parameters the attention module creates for it (e.g. a
             sink logit per head)
  check      check(values) raises ParamError(key, message) for a bad value (optional)
  pallas     pallas(values, step, num_keys, per_row[, learned]) -> the two-pass kernels'
             normalizer arguments ({'gamma': ..., 'zeta': ...} or {'sink': ...}), or None where
             the kernels cannot run it (per_row: rows see different numbers of keys, causal or
             padded); None = no kernel. `learned` (passed only when the normalizer has learned
             parameters) maps each `learned` kwarg to the attention module's array
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """A normalizer as the attention module uses it.

  fn(scores, where, n_keys) -> weights; `n_keys` is the number of keys each row sees
  (broadcastable to the rows), used by length-dependent normalizers.
  normalize_qk: L2-normalise queries and keys before the dot product (softplus attention).
  score_scale(head_dim, n_keys): multiplier of q.k (1/sqrt(d) for softmax variants,
  log(d) * log(N) for softplus attention).
  """
  name: str
  fn: Callable[..., Array]
  normalize_qk: bool = False
  score_scale: Callable[[int, Array], Array] = lambda d, n: 1.0 / math.sqrt(d)
  # learned parameters the attention module creates and passes to fn as keyword arguments:
  # {kwarg: (parameter name, num_heads -> (initializer, shape))}
  learned: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

  def __call__(self, x: Array, where: Optional[Array] = None, n_keys=None, **learned) -> Array:
    """Normalise scores along the last axis (`learned`: the arrays of `self.learned`)."""
    return self.fn(x, where=where, n_keys=n_keys, **learned)


class ParamError(ValueError):
  """A bad value of one attention-config key: `key` names it, and the config check prefixes the
  tower's path (model.image.attention.<key>)."""

  def __init__(self, key: str, message: str):
    super().__init__(f"{key}: {message}")
    self.key, self.message = key, message


@dataclasses.dataclass(frozen=True)
class Spec:
  """A registered normalizer (module docstring)."""
  name: str
  params: Mapping[str, Any]
  factory: Callable[..., Normalizer]
  from_config: Callable[[Mapping[str, Any], Any], Normalizer]
  check: Optional[Callable[[Mapping[str, Any]], None]] = None
  pallas: Optional[Callable[..., Optional[dict]]] = None


_REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
  """Add a normalizer; its params must not clash in default with another's of the same key."""
  if spec.name in _REGISTRY:
    raise ValueError(f"normalizer {spec.name!r} is already registered")
  for other in _REGISTRY.values():
    for k in set(other.params) & set(spec.params):
      if other.params[k] != spec.params[k]:
        raise ValueError(f"normalizer {spec.name!r}: parameter {k!r} defaults to "
                         f"{spec.params[k]!r}, but {other.name!r} defaults it to "
                         f"{other.params[k]!r}")
  _REGISTRY[spec.name] = spec
  return spec


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def spec(name: str) -> Spec:
  """The registered Spec `name`; ValueError naming the choices otherwise."""
  if name not in _REGISTRY:
    hint = (" (gated attention is `attention.gate`, used with any normalizer)"
            if "gate" in name else "")
    raise ValueError(f"unknown normalizer {name!r}; choose one of {names()}{hint}")
  return _REGISTRY[name]


def get(name: str, **kwargs) -> Normalizer:
  """Normalizer by name, e.g. get('clipped_softmax', alpha=1.0) (gating is orthogonal)."""
  return spec(name).factory(**kwargs)


def all_params() -> dict[str, Any]:
  """Every normalizer parameter key with its default (the attention config block holds all)."""
  out: dict[str, Any] = {}
  for s in _REGISTRY.values():
    out.update(s.params)
  return out


def no_kwargs(name, kwargs):
  if kwargs:
    raise TypeError(f"normalizer {name!r} got unexpected parameters {sorted(kwargs)}")
