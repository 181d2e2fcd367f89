"""Data-source registry: `data.name` -> a factory(config, split) -> random-access source.

A source module registers itself when imported (`register_source('folder', factory)`); a name
ending in ':' is a prefix (`tfds:` serves `tfds:cifar10`). A built-in source is imported the
first time its name is asked for: the module `qtx.data.<name>` (the part before ':'), else
every module of `qtx.data` is imported until one registers it. So optional dependencies
(tensorflow_datasets, PIL) load only when used, and a new source is one new module.
`qtx.data.sources` documents what a source returns.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

_SOURCES: dict[str, Callable] = {}
# Source options: config block name (data.<block>) -> (defaults() -> ConfigDict, check or None).
_OPTIONS: dict[str, tuple[Callable, Optional[Callable]]] = {}

def register_source(name: str, factory: Callable, options: Optional[Callable] = None,
                    check: Optional[Callable] = None) -> None:
  """factory(config, split) -> source; `name` may be a prefix ending in ':' (e.g. 'tfds:').

  A source with options of its own owns the config block data.<name> (without the ':'):
  options() returns its keys with their defaults (an ml_collections.ConfigDict), and
  check(block) raises ValueError naming a bad key by its full path (data.<name>.<key>).
  """
  _SOURCES[name] = factory
  if options is not None:
    _OPTIONS[name.rstrip(":")] = (options, check)


def option_blocks() -> dict:
  """{block name: its defaults} of every source with options (config_lib puts them under data)."""
  _import_all()
  return {name: options() for name, (options, _) in sorted(_OPTIONS.items())}


def check_options(data) -> None:
  """Runs each source's check on its block of the data config (whichever source is in use)."""
  _import_all()
  for name, (_, check) in sorted(_OPTIONS.items()):
    if check is not None and name in data:
      check(data[name])


def _lookup(name: str) -> Optional[Callable]:
  if name in _SOURCES:
    return _SOURCES[name]
  for key, factory in _SOURCES.items():
    if key.endswith(":") and name.startswith(key):
      return factory
  return None


# qtx.data modules left out by _import_all for want of a third-party package: {module: package}
_UNAVAILABLE: dict[str, str] = {}


def _import_quietly(module: str) -> None:
  """Import `module`; nothing when it does not exist (the source modules import their optional
  dependencies, e.g. tensorflow_datasets, only when a source is built). A module that needs a
  third-party package this environment lacks (grain, regex: installed with qtx, but absent
  where only a step is compiled, as on a bare accelerator machine) is left out and recorded; an
  unknown data.name then names what is missing."""
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name == module:
      return
    if e.name and e.name.split(".")[0] != "qtx":
      _UNAVAILABLE[module] = e.name
      return
    raise


def _import_all() -> None:
  """Import every module of qtx.data (each source module registers itself)."""
  import pkgutil
  import qtx.data
  for info in pkgutil.iter_modules(qtx.data.__path__):
    _import_quietly(f"qtx.data.{info.name}")


def names() -> tuple[str, ...]:
  """Every source name that make_source accepts (prefixes end in ':')."""
  _import_all()
  return tuple(sorted(_SOURCES))


def get_factory(name: str) -> Callable:
  factory = _lookup(name)
  if factory is None:
    base = name.split(":", 1)[0]
    if base.isidentifier():
      _import_quietly(f"qtx.data.{base}")
    factory = _lookup(name)
  if factory is None:
    _import_all()
    factory = _lookup(name)
  if factory is None:
    missing = "".join(f"; {m} was not imported, it needs the package {pkg!r} (pip install -e .)"
                      for m, pkg in sorted(_UNAVAILABLE.items()))
    raise ValueError(f"unknown data.name {name!r}; choose one of {names()}{missing}")
  return factory


def make_source(config, split: str):
  """The source `config.data.name` names, for split 'train' or 'eval'."""
  return get_factory(config.data.name)(config, split)


def data_dir(config) -> Optional[str]:
  """config.data.path with '~' expanded, or None when empty."""
  path = config.data.path
  return os.path.expanduser(path) if path else None
