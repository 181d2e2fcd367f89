"""Data-source registry: `data.name` -> a factory(config, split) -> random-access source.

A source module registers itself when imported (`register_source('folder', factory)`); a name
ending in ':' is a prefix (`tfds:` serves `tfds:cifar10`). The built-in sources are imported the
first time their name is asked for, so optional dependencies (tensorflow_datasets, PIL) load
only when used. `qtx.data.sources` documents what a source returns.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

_SOURCES: dict[str, Callable] = {}

# Built-in sources: registered name -> the module that registers it on import.
BUILTIN = {
    "synthetic": "qtx.data.synthetic",
    "folder": "qtx.data.folder",
    "imagefolder": "qtx.data.imagefolder",
    "webdataset": "qtx.data.webdataset",
    "tfds:": "qtx.data.tfds_source",
    "fashion_mnist": "qtx.data.fashion_mnist",
    "fashion_mnist:": "qtx.data.fashion_mnist",
}


def register_source(name: str, factory: Callable) -> None:
  """factory(config, split) -> source; `name` may be a prefix ending in ':' (e.g. 'tfds:')."""
  _SOURCES[name] = factory


def _lookup(name: str) -> Optional[Callable]:
  if name in _SOURCES:
    return _SOURCES[name]
  for key, factory in _SOURCES.items():
    if key.endswith(":") and name.startswith(key):
      return factory
  return None


def _builtin_key(name: str) -> Optional[str]:
  if name in BUILTIN:
    return name
  prefixes = [k for k in BUILTIN if k.endswith(":") and name.startswith(k)]
  return prefixes[0] if prefixes else None


def names() -> tuple[str, ...]:
  """Every source name that make_source accepts (prefixes end in ':')."""
  return tuple(sorted(set(BUILTIN) | set(_SOURCES)))


def get_factory(name: str) -> Callable:
  factory = _lookup(name)
  if factory is None and _builtin_key(name) is not None:
    importlib.import_module(BUILTIN[_builtin_key(name)])
    factory = _lookup(name)
  if factory is None:
    raise ValueError(f"unknown data.name {name!r}; choose one of {names()}")
  return factory


def make_source(config, split: str):
  """The source `config.data.name` names, for split 'train' or 'eval'."""
  return get_factory(config.data.name)(config, split)


def data_dir(config) -> Optional[str]:
  """config.data.path with '~' expanded, or None when empty."""
  path = config.data.path
  return os.path.expanduser(path) if path else None
