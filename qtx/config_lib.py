"""Config schema and presets.

Every run is described by one `ml_collections.ConfigDict`. The presets here are the single
source of the schema: `configs/*.py` call them, and unknown keys are rejected both by
ConfigDict (on command-line overrides) and by `validate`.
"""
from __future__ import annotations

import json

import ml_collections

from qtx.data import registry

# Remedy presets (`set_normalizer`, the config words, the sweep's rows): the attention
# normalizer and gate of both towers, or one other remedy on top of softmax.
NORMALIZER_PRESETS = ("softmax", "clipped_softmax", "gated", "softplus", "softmax_sink",
                      "gated_mlp", "gated_all_heads", "gated_elementwise", "registers", "muon")
PRESET_GATES = {"gated": "linear", "gated_mlp": "mlp", "gated_all_heads": "all_heads_linear",
                "gated_elementwise": "elementwise"}
PRESET_REGISTERS = 4  # the 'registers' preset (Darcet et al. 2023 use 4 at ViT-B scale)
# The 'clipped_softmax' preset's alpha (gamma = -alpha / N). At alpha = 1 the clip threshold
# 1/(N + 1) sits at a uniform row's probability 1/N, and on the tiny CLIP the per-tensor 8-bit
# probability grid then erases much of the attention (W8A8 -17 to -34 points); at 0.5 it
# loses what softmax loses (docs/remedies.md, "Clipped softmax under W8A8").
PRESET_CLIPPED_ALPHA = 0.5


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file given as 'path.py' or 'path.py:arg'."""
  import importlib.util
  arg = None
  if ":" in path:
    path, arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("qtx_config_file", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """Apply one 'key.path=value' override in place, the value parsed as a Python literal when it
  is one (else kept as a string), as --config.key.path=value does on the command line."""
  import ast
  key, sep, value = assignment.partition("=")
  if not sep:
    raise ValueError(f"override {assignment!r} is not KEY=VALUE")
  *path, last = key.strip().split(".")
  node = config
  for i, p in enumerate(path):
    if p not in node:
      raise ValueError(f"unknown config key {'.'.join(path[:i + 1])!r} in override {assignment!r}")
    node = node[p]
  if last not in node:
    raise ValueError(f"unknown config key {key.strip()!r} in override {assignment!r}")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  node[last] = parsed


def attention_config(normalizer: str = "softmax") -> ml_collections.ConfigDict:
  """Attention block of one tower: normalizer (a name of qtx.nn.normalizers), every registered
  normalizer's parameters with their defaults (each normalizer module declares its own: e.g.
  clipped_softmax gamma/alpha/zeta/gamma_warmup_steps, softplus softplus_p/softplus_eps),
  gate (none | linear | mlp | all_heads_linear | elementwise) with gate_hidden and gate_pi_init, and impl
  (xla | pallas)."""
  from qtx.nn import attention, normalizers
  c = ml_collections.ConfigDict()
  for key, value in {**attention.COMMON_KEYS, **normalizers.all_params()}.items():
    # a None default is an optional float (e.g. alpha): typed, so overrides parse as numbers
    c[key] = ml_collections.FieldReference(None, field_type=float) if value is None else value
  c.normalizer = normalizer
  return c


def quant_config() -> ml_collections.ConfigDict:
  """The quant block: QuantConfig's fields with its defaults (qtx.quant.layers: enabled, bit
  widths, granularities, estimator, percentile, momentum, keep_float as a comma-separated
  string), then the keys the modes read: calib_batches (ptq), outliers_every_steps (train, 0 =
  off), ablate (ptq: also evaluate with one quantizer class at a time in float)."""
  import dataclasses
  from qtx.quant.layers import QuantConfig
  q = QuantConfig()
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(QuantConfig):
    v = getattr(q, f.name)
    c[f.name] = ",".join(v) if isinstance(v, tuple) else v
  return c


def tower_config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.width = kw.pop("width")
  c.depth = kw.pop("depth")
  c.heads = kw.pop("heads")
  c.mlp_dim = kw.pop("mlp_dim")
  c.activation = kw.pop("activation", "gelu_tanh")  # gelu_tanh | gelu (open_clip) | quick_gelu
  c.attention = attention_config()
  if "image_size" in kw:  # image tower: learned register tokens (Darcet et al. 2023), 0 = none
    c.registers = kw.pop("registers", 0)
  for k, v in kw.items():
    c[k] = v
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | ptq | sweep | compile (qtx.modes)
  c.seed = 0
  c.init_from = ""  # checkpoint dir (qtx) or a PyTorch CLIP state_dict file

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 512
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.scan = False  # nn.scan over layers
  c.model.remat = "none"  # none | full | dots (nn.remat policy per block)
  c.model.image = tower_config(width=768, depth=12, heads=12, mlp_dim=3072,
                               image_size=224, patch_size=16, ln_pre=True, channels=3)
  c.model.text = tower_config(width=512, depth=12, heads=8, mlp_dim=2048,
                              vocab_size=49408, context_length=77)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "clip"  # clip | siglip | infoloob
  c.loss.init_logit_scale = -1.0  # < 0: loss default (log(1/0.07) for clip/infoloob, log(10) siglip)
  c.loss.init_logit_bias = -10.0  # siglip only
  c.loss.max_logit_scale = 100.0
  c.loss.impl = "xla"  # xla | pallas (row-wise log-sum-exp via the two-pass kernel)
  c.loss.sharded = False  # True: ring (shard_map) loss, memory independent of device count

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"
  c.data.path = ""
  c.data.eval_path = ""  # webdataset: held-out shards (else 2% of data.path by key hash)
  c.data.augment = "none"  # none | random_resized_crop (training only; eval never augments)
  c.data.augment_scale = (0.9, 1.0)  # random_resized_crop: range of the crop's area fraction
  c.data.num_workers = 0
  c.data.prefetch = 2
  # each source with options of its own owns the block data.<source> (data.synthetic, ...)
  for name, block in registry.option_blocks().items():
    c.data[name] = block
  # pod presets set these: the embedded synthetic shapes are refused there (a pod would train
  # on toy data) unless the config argument says 'runlocal'
  c.data.allow_synthetic = True
  c.data.preset = ""

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256
  c.train.total_steps = 1000
  c.train.lr = 5e-4
  c.train.warmup_steps = 100
  c.train.end_lr_fraction = 0.0
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.grad_clip = 1.0
  c.train.optimizer = "adamw"  # adamw | muon (Muon on the blocks' weight matrices; qtx.optim)
  c.train.log_every = 10
  # > 0: that many microbatches per step (exact contrastive loss, qtx.step); 0 = auto: the
  # fewest that fit the accelerator's memory (qtx.aot.fit; 1 on the CPU)
  c.train.microbatches = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.num_samples = 1024
  c.eval.batch_size = 256
  # extra zero-shot evaluators besides the training data's eval split: comma-separated data
  # source names, each optionally with '@<data path>' (e.g. "fashion_mnist,tfds:cifar10@/tfds")
  c.eval.zeroshot = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # 0 = only at the end
  c.checkpoint.keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.mesh.rules = "default"  # logical-axis rule set (qtx.parallel.RULE_SETS)
  c.mesh.num_devices = 0  # 0 = all devices; N = the first N (e.g. a 1-device run on a host)

  c.quant = quant_config()
  c.quant.calib_batches = 16
  c.quant.outliers_every_steps = 0  # 0 = off during training
  c.quant.ablate = False  # ptq mode: also evaluate with one quantizer class at a time in float
  # ptq mode: also evaluate these named settings (qtx.analysis.quantized.SETTINGS), comma-
  # separated, e.g. "w8a8_token,w4a8"; metrics ptq/<setting>_<metric>
  c.quant.settings = ""

  c.compile = ml_collections.ConfigDict()  # compile mode (qtx.modes.compile, qtx.aot)
  c.compile.topology = "v5e:2x2"  # v5e:2x4, v5e:16x16, v6e:2x4, v4:2x2x1, v5p:2x2x2, v5e-8, ...
  c.compile.what = "train"  # train | eval | ptq | all, or comma-separated program names
  c.compile.find_batch = False  # True: search the largest per-chip batch that fits
  c.compile.num_slices = 1  # > 1: a multi-slice job (slices joined over the data-centre network)
  c.compile.per_chip_batch = 0  # > 0: train.batch_size = this x chips
  c.compile.hbm_headroom = 0.1  # fits = planned memory <= (1 - headroom) x HBM (also for auto)

  c.sweep = ml_collections.ConfigDict()  # sweep mode (qtx.modes.sweep)
  c.sweep.normalizers = ",".join(NORMALIZER_PRESETS)  # comma-separated normalizer presets
  c.sweep.seeds = "0,1,2"  # comma-separated seeds
  c.sweep.out = ""  # markdown file the table is written to (rewritten after every run)
  c.sweep.only_finished = False  # True: tabulate the finished runs only, train nothing
  return c


def set_normalizer(c: ml_collections.ConfigDict, preset: str) -> None:
  """Apply a remedy preset: the normalizer and gate of both towers (clipped_softmax: alpha =
  PRESET_CLIPPED_ALPHA, so gamma = -alpha/N per row; gated*: softmax with that gate), or softmax in both towers plus
  `registers` (model.image.registers = 4) or `muon` (train.optimizer = muon). A preset sets only
  what it is about: the registers and the optimizer keep their values under the other presets."""
  if preset not in NORMALIZER_PRESETS:
    raise ValueError(f"unknown normalizer preset {preset!r}; choose one of {NORMALIZER_PRESETS}")
  if preset == "registers":
    c.model.image.registers = PRESET_REGISTERS
  if preset == "muon":
    c.train.optimizer = "muon"
  for tower in (c.model.image, c.model.text):
    a = tower.attention
    if preset in PRESET_GATES:
      a.normalizer = "softmax"
      a.gate = PRESET_GATES[preset]
    else:
      a.normalizer = "softmax" if preset in ("registers", "muon") else preset
      a.gate = "none"
    if preset == "clipped_softmax":
      a.alpha = PRESET_CLIPPED_ALPHA
      a.gamma_warmup_steps = 0


def tiny_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Tiny CLIP for CPU: 64 px images in 8 px patches (65 tokens, mostly plain background),
  two 3-layer width-64 towers, 1300 steps of batch 128 on the embedded synthetic dataset, the
  learning rate decaying to 30% of its peak (docs/results.md has the measurements behind it)."""
  c = base_config()
  c.model.embed_dim = 64
  c.model.image = tower_config(width=64, depth=3, heads=4, mlp_dim=256,
                               image_size=64, patch_size=8, ln_pre=True, channels=3)
  c.model.text = tower_config(width=64, depth=3, heads=4, mlp_dim=256,
                              vocab_size=49408, context_length=20)
  c.data.name = "synthetic"
  c.data.synthetic.eval_size = 1000
  c.train.batch_size = 128
  c.train.total_steps = 1300
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.end_lr_fraction = 0.3
  c.train.weight_decay = 0.05
  c.train.log_every = 20
  c.eval.every_steps = 650
  c.eval.num_samples = 1000
  c.eval.batch_size = 250
  c.checkpoint.every_steps = 650
  c.checkpoint.keep = 2
  c.quant.outliers_every_steps = 100
  normalizer, _ = config_words(arg)  # 'runlocal' changes nothing: this config is local already
  set_normalizer(c, normalizer)
  # Softplus re-weighting exponent for these short sequences (<= 65 keys): p = 1 learns fastest
  # here (1000-step zero-shot top-1: p=15 31.4%, p=3 50.7%, p=1 58.5%; docs/results.md).
  for tower in (c.model.image, c.model.text):
    tower.attention.softplus_p = 1.0
  return c


def config_words(arg: str | None) -> tuple[str, bool]:
  """(normalizer preset, runlocal) from a config argument of comma-separated words, as in
  'configs/clip_b16.py:gated,runlocal' (big_vision style): at most one remedy preset
  (NORMALIZER_PRESETS) and/or 'runlocal'."""
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  presets = [w for w in words if w in NORMALIZER_PRESETS]
  unknown = [w for w in words if w not in NORMALIZER_PRESETS and w != "runlocal"]
  if unknown:
    raise ValueError(f"unknown config argument word(s) {unknown}; use comma-separated words "
                     f"from {NORMALIZER_PRESETS + ('runlocal',)}, e.g. 'gated,runlocal'")
  if len(presets) > 1:
    raise ValueError(f"config argument names {len(presets)} normalizer presets {presets}; "
                     "give at most one")
  return (presets[0] if presets else "softmax"), "runlocal" in words


def _pod_config(arg, patch_size: int, name: str) -> ml_collections.ConfigDict:
  """OpenAI CLIP ViT-B/<patch> for accelerators: bfloat16 compute, data parallel over all
  devices with full remat of each block, as many microbatches as the chips' memory needs
  (auto), a checkpoint every 1000 steps. It refuses the embedded synthetic data unless
  'runlocal' (a few tiny steps for a local smoke run) is among the config words.

  Why data parallel and full remat (compile mode on v5e-8, B/16 at the preset's 512 images per
  chip; the compiler's cost model, docs/notes/compile_b16.md): FSDP with remat of the dots needs
  8 microbatches to fit (10.4 GiB planned) and moves 3.0 TB of HBM per chip and step, a roofline
  of 3.7 s (8.7% MFU); replicated parameters (1.8 GB of parameters and Adam moments per chip)
  with full remat fit without microbatches (7.6 GiB) and move 0.47 TB, a roofline of 0.57 s
  (55.8% MFU). FSDP stays one override away (mesh.shape.fsdp=-1) for larger models."""
  normalizer, runlocal = config_words(arg)
  c = base_config()
  c.model.image.patch_size = patch_size
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.allow_synthetic = False
  c.data.preset = name
  c.train.batch_size = 4096
  c.train.total_steps = 100_000
  c.train.lr = 5e-4
  c.train.warmup_steps = 2000
  c.eval.every_steps = 5000
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.train.microbatches = 0  # auto: as many as the chips' memory needs (qtx.aot.fit)
  set_normalizer(c, normalizer)
  if runlocal:
    c.data.allow_synthetic = True
    c.train.batch_size = 8
    c.train.microbatches = 1
    c.train.total_steps = 4
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.eval.every_steps = 0
    c.eval.num_samples = 16
    c.eval.batch_size = 8
    c.data.synthetic.eval_size = 16
    c.checkpoint.every_steps = 2
  return c


def b16_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """OpenAI CLIP ViT-B/16 architecture (149,620,737 parameters)."""
  return _pod_config(arg, 16, "configs/clip_b16.py")


def b32_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """OpenAI CLIP ViT-B/32 architecture (151,277,313 parameters), the usual CC3M/CC12M
  baseline."""
  return _pod_config(arg, 32, "configs/clip_b32.py")


# Keys added after runs were first saved, with the value that reproduces a run saved before the
# key existed (data.synthetic.omit_prob: such runs trained on full captions). `fill_legacy` adds
# them to a saved config (run.load_config and train mode's resume check read config.json
# through it).
LEGACY_DEFAULTS = {"train.optimizer": "adamw", "model.image.registers": 0,
                   "quant.settings": "",
                   "data.synthetic.omit_prob": 0.0, "data.synthetic.shape_scale": 1.0,
                   "data.eval_path": "",
                   "data.augment": "none", "data.augment_scale": (0.9, 1.0),
                   "data.allow_synthetic": True, "data.preset": "",
                   "sweep.normalizers": "softmax,clipped_softmax,gated,softplus",
                   "sweep.seeds": "0,1,2",
                   "sweep.out": "",
                   "compile.topology": "v5e:2x2", "compile.what": "train",
                   "compile.find_batch": False, "compile.num_slices": 1,
                   "compile.per_chip_batch": 0, "compile.hbm_headroom": 0.1}


# Keys that runs once saved and the schema has since dropped (data.image_size only repeated
# model.image.image_size); `fill_legacy` removes them.
LEGACY_REMOVED = ("data.image_size",)
# quant.keep_float names that once were accepted and never did anything; fill_legacy drops them.
LEGACY_KEEP_FLOAT = ("gates", "temperature")
# Keys that moved: the synthetic source's options now live in its own block.
LEGACY_RENAMED = {"data.omit_prob": "data.synthetic.omit_prob",
                  "data.shape_scale": "data.synthetic.shape_scale",
                  "data.eval_size": "data.synthetic.eval_size"}


def _node(config, parents, create: bool):
  node = config
  for p in parents:
    if p not in node:
      if not create:
        return None
      node[p] = {}
    node = node[p]
  return node


ABSENT = "<absent>"


def flat(d, prefix: str = "") -> dict:
  """Nested dicts -> {'a.b.c': value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(saved: dict, config: ml_collections.ConfigDict, both: bool = False
                ) -> dict[str, tuple]:
  """{key: (saved value, config's value)} for every flat key where the saved config (a run's
  config.json, legacy keys filled in) and `config` differ; a key one side lacks has ABSENT
  there, or is skipped with both=True (only keys both have are compared)."""
  # the JSON round trip makes tuples compare like the saved lists
  old = flat(json.loads(json.dumps(fill_legacy(saved))))
  new = flat(json.loads(config.to_json_best_effort()))
  keys = set(old) & set(new) if both else set(old) | set(new)
  return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(keys)
          if old.get(k, ABSENT) != new.get(k, ABSENT)}


def fill_legacy(config: dict) -> dict:
  """A saved config (nested dicts or a ConfigDict) with the keys it predates filled in and the
  keys the schema dropped removed."""
  for key in LEGACY_REMOVED:
    *parents, name = key.split(".")
    node = _node(config, parents, create=False)
    if node is not None and name in node:
      del node[name]
  for old, new in LEGACY_RENAMED.items():
    *old_parents, old_name = old.split(".")
    node = _node(config, old_parents, create=False)
    if node is not None and old_name in node:
      value = node[old_name]
      del node[old_name]
      *new_parents, new_name = new.split(".")
      _node(config, new_parents, create=True)[new_name] = value
  for key, value in LEGACY_DEFAULTS.items():
    *parents, name = key.split(".")
    node = _node(config, parents, create=True)
    if name not in node:
      node[name] = value
  # quant.keep_float once listed 'gates' and 'temperature', which were always float anyway
  quant = _node(config, ("quant",), create=False)
  if quant is not None and isinstance(quant.get("keep_float"), str):
    names = [n.strip() for n in quant["keep_float"].split(",") if n.strip()]
    if any(n in LEGACY_KEEP_FLOAT for n in names):
      quant["keep_float"] = ",".join(n for n in names if n not in LEGACY_KEEP_FLOAT)
  # a normalizer added since the run was saved: its keys at their defaults (unused by the run)
  from qtx.nn import normalizers
  for tower in ("image", "text"):
    block = _node(config, ("model", tower, "attention"), create=False)
    if block is not None:
      for name, value in normalizers.all_params().items():
        if name not in block:
          block[name] = value
  return config


MODES = ("train", "eval", "ptq", "sweep", "compile")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the first bad value by its full key (unknown keys are also caught by
  ConfigDict on command-line overrides). Composed of each component's own check."""
  from qtx import losses
  from qtx.data import augment as augment_lib
  from qtx.nn import clip
  from qtx.quant.layers import QuantConfig

  if c.mode not in MODES:
    raise ValueError(f"unknown mode {c.mode!r}; choose one of {MODES}")
  if c.loss.name not in losses.LOSSES:
    raise ValueError(f"unknown loss.name {c.loss.name!r}; choose one of {tuple(losses.LOSSES)}")
  if c.loss.sharded and losses.get(c.loss.name).ring is None:
    raise ValueError(f"loss.sharded=True: loss {c.loss.name!r} has no ring variant; set "
                     "loss.sharded=False")
  if c.loss.impl not in ("xla", "pallas"):
    raise ValueError(f"unknown loss.impl {c.loss.impl!r}; choose one of ('xla', 'pallas')")
  clip.check_model_config(c.model)
  augment_lib.check(c.data.augment, c.data.augment_scale)
  if c.data.name == "synthetic" and not c.data.allow_synthetic and c.mode != "compile":
    preset = c.data.preset or "this preset"
    raise ValueError(
        f"data.name=synthetic: {preset} is a pod preset and refuses the embedded synthetic "
        "shapes; point it at your data (--config.data.name=webdataset|folder|tfds:NAME "
        f"--config.data.path=...), or run a local smoke test with {preset}:runlocal "
        "(a few tiny steps on the synthetic data)")
  registry.check_options(c.data)
  for key in ("batch_size", "total_steps", "log_every"):
    if c.train[key] <= 0:
      raise ValueError(f"train.{key} must be > 0, got {c.train[key]}")
  if c.train.microbatches < 0:
    raise ValueError(f"train.microbatches must be >= 0 (0 = auto), got {c.train.microbatches}")
  if c.train.microbatches and c.train.batch_size % c.train.microbatches:
    raise ValueError(f"train.batch_size {c.train.batch_size} is not divisible by "
                     f"train.microbatches {c.train.microbatches}")
  if c.train.lr <= 0 or not c.train.lr < float("inf"):
    raise ValueError(f"train.lr must be a positive finite number, got {c.train.lr}")
  from qtx import optim
  if c.train.optimizer not in optim.OPTIMIZERS:
    raise ValueError(f"unknown train.optimizer {c.train.optimizer!r}; choose one of "
                     f"{optim.OPTIMIZERS}")
  if not 0.0 <= c.train.end_lr_fraction <= 1.0:
    raise ValueError(f"train.end_lr_fraction must be in [0, 1], got {c.train.end_lr_fraction}")
  try:
    QuantConfig.from_config(c.quant)
  except (ValueError, TypeError) as e:
    raise ValueError(f"quant: {e}") from None
  if c.mode == "compile" and not 0.0 <= c.compile.hbm_headroom < 1.0:
    raise ValueError(f"compile.hbm_headroom must be in [0, 1), got {c.compile.hbm_headroom}")
  from qtx.quant import settings as quant_settings
  quant_settings.setting_names(c.quant.get("settings", ""))
