"""The no-op mechanism at small scale: the Bigram-Backcopy study.

  python -m qtx.analysis.backcopy --presets softmax,clipped_softmax,softmax_sink \\
      --seeds 0,1,2 --steps 15000 --workdir runs/backcopy --out docs/backcopy_table.md

A 2-layer, 1-head causal LM (qtx.nn.causal_lm: the same attention module, normalizers, gates and
quantizers as CLIP) trained on qtx.data.bigram_backcopy with each remedy preset (the presets of
config_lib.set_normalizer that apply to a causal LM: normalizers, gates, muon; registers are an
image-tower remedy). Every `--eval_every` steps a fixed probe set of sequences is measured, per
layer l (queries t >= 1; "active" = trigger positions, "dormant" = the others):

  L<l>/bos_mass_{dormant,active}   attention probability on BOS (the sink candidate)
  L<l>/null_mass                   1 - sum_j p_ij: mass given to no key (sink logit, clipping)
  L<l>/score_range                 mean over rows of max_j s_ij - min_j s_ij (softmax input)
  L<l>/score_absmax                max |s_ij| over visible keys
  L<l>/value_norm_{bos,other}      ||v_t||, the value projection's output
  L<l>/attn_out_norm_{bos,other}   ||attention block output_t|| (what the head writes)
  L<l>/ffn_out_norm_{bos,other}    ||MLP output_t||
  L<l>/resid_norm_{bos,other}      ||block output_t|| (the residual stream)
  L<l>/resid_absmax_{bos,other}    max |block output| over channels (sets a per-tensor range)
  max_inf_norm, avg_kurtosis       qtx.quant.outliers over block and FFN outputs
  loss, copy_acc, bigram_loss      next-token loss; accuracy on the copies; loss elsewhere

and at the end of training, for each quantization setting (qtx.quant.settings: w8a8 = the
paper's per-tensor static, w8a8_token, w4a8), calibrated on 8 training batches:
  <setting>/loss, <setting>/copy_acc, <setting>/loss_increase (over the float model).

Each (preset, seed) run writes WORKDIR/<preset>/seed<k>/history.jsonl and done.json; finished
runs are reused, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qtx import config_lib, optim
from qtx.data.bigram_backcopy import BigramBackcopy
from qtx.nn.attention import AttentionConfig
from qtx.nn.causal_lm import CausalLM
from qtx.quant import outliers
from qtx.quant.layers import QUANT_STATS, QuantConfig
from qtx.quant.settings import SETTINGS

PRESETS = ("softmax", "clipped_softmax", "softmax_sink", "gated", "gated_elementwise",
           "softplus", "muon")
QUANT_SETTINGS = ("w8a8", "w8a8_token", "w4a8")
BACKCOPY_CLIPPED_ALPHA = 1.0
PROBE_INDEX = 10 ** 9  # probe and calibration batches are drawn far from the training indices


def study_config(preset: str = "softmax") -> ml_collections.ConfigDict:
  """Task, model and optimizer of the study (PAPERS.md section 10's probe setting)."""
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(vocab_size=64, seq_len=32, num_triggers=3,
                                          concentration=0.05, seed=0))
  c.model = ml_collections.ConfigDict(dict(width=64, depth=2, heads=1, mlp_dim=256, scan=False))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, total_steps=15000, lr=9e-4, warmup_steps=200, end_lr_fraction=1.0,
      weight_decay=1e-4, b1=0.9, b2=0.999, grad_clip=1.0, optimizer="adamw"))
  # the preset's attention block (the CLIP text tower's, as config_lib sets it) and optimizer
  clip = config_lib.tiny_config()
  config_lib.set_normalizer(clip, preset)
  if preset == "clipped_softmax":
    # This study's clipped softmax is alpha = 1 (gamma = -1/N), the setting its tables were
    # measured with; the CLIP preset moved to PRESET_CLIPPED_ALPHA after the W8A8 search.
    clip.model.text.attention.alpha = BACKCOPY_CLIPPED_ALPHA
  c.attention = clip.model.text.attention
  c.train.optimizer = clip.train.optimizer
  return c


def build(c):
  task = BigramBackcopy(**c.task.to_dict())
  att = AttentionConfig.from_config(c.attention)
  kw = dict(vocab_size=c.task.vocab_size, context_length=c.task.seq_len, width=c.model.width,
            depth=c.model.depth, heads=c.model.heads, mlp_dim=c.model.mlp_dim, attention=att)
  return task, (lambda quant=None: CausalLM(**kw, quant=quant))


def _losses(logits_BxTxV, tokens_BxT):
  """Per-position next-token cross-entropy, B x (T-1)."""
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32))
  return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], -1)[..., 0]


def _capture(mdl, method_name):
  return method_name == "__call__" and mdl.name in ("scores_quant", "value", "attn")


def make_probe(model: CausalLM, depth: int):
  """Jitted (params, tokens, trigger mask) -> the module docstring's per-probe metrics."""

  def fn(params, tokens, trig):
    logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"],
                                capture_intermediates=_capture)
    inter = state["intermediates"]["encoder"]
    B, T = tokens.shape
    ce = _losses(logits, tokens)  # predicting t+1 from t
    copy = trig[:, :-1]
    pred_ok = jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]
    f = lambda m: m.astype(jnp.float32)
    out = {"loss": jnp.mean(ce),
           "copy_acc": jnp.sum(f(pred_ok & copy)) / jnp.maximum(jnp.sum(f(copy)), 1.0),
           "bigram_loss": jnp.sum(ce * f(~copy)) / jnp.maximum(jnp.sum(f(~copy)), 1.0)}
    q = jnp.arange(T) >= 1  # queries after BOS
    dormant = f((~trig) & q[None])  # B x T
    active = f(trig & q[None])
    causal = jnp.tril(jnp.ones((T, T), bool))

    def mean_over(x_BxT, w_BxT):
      return jnp.sum(x_BxT * w_BxT) / jnp.maximum(jnp.sum(w_BxT), 1.0)

    def split_norm(name, x_BxTxD, l):
      n = jnp.linalg.norm(x_BxTxD.astype(jnp.float32), axis=-1)
      out[f"L{l}/{name}_bos"] = jnp.mean(n[:, 0])
      out[f"L{l}/{name}_other"] = jnp.mean(n[:, 1:])

    for l in range(depth):
      blk = inter[f"block_{l}"]
      att = blk["attn"]
      p = att["attn_probs"][0].astype(jnp.float32)  # B x H x T x S
      bos = p[..., 0].mean(1)  # B x T, mean over heads
      out[f"L{l}/bos_mass_dormant"] = mean_over(bos, dormant)
      out[f"L{l}/bos_mass_active"] = mean_over(bos, active)
      out[f"L{l}/null_mass"] = mean_over((1.0 - p.sum(-1)).mean(1), f(q[None].repeat(B, 0)))
      s = att["scores_quant"]["__call__"][0].astype(jnp.float32)  # B x H x T x S
      hi = jnp.max(jnp.where(causal, s, -jnp.inf), -1)
      lo = jnp.min(jnp.where(causal, s, jnp.inf), -1)
      out[f"L{l}/score_range"] = jnp.mean((hi - lo)[:, :, 1:])
      out[f"L{l}/score_absmax"] = jnp.max(jnp.where(causal, jnp.abs(s), 0.0))
      # the value layer is called twice in the fused q/k/v matmul (quant.layers.fused_dense):
      # for its kernel, then for its output; the last call returns the values
      split_norm("value_norm", att["value"]["__call__"][-1], l)
      split_norm("attn_out_norm", att["__call__"][0], l)
      split_norm("ffn_out_norm", blk["ffn_out"][0], l)
      h = blk["block_out"][0].astype(jnp.float32)
      split_norm("resid_norm", h, l)
      out[f"L{l}/resid_absmax_bos"] = jnp.max(jnp.abs(h[:, 0]))
      out[f"L{l}/resid_absmax_other"] = jnp.max(jnp.abs(h[:, 1:]))
    tensors = {f"block_{l}": {k: inter[f"block_{l}"][k] for k in outliers.TENSORS}
               for l in range(depth)}
    summary = outliers.summarize(tensors)
    out["max_inf_norm"] = summary["max_inf_norm"]
    out["avg_kurtosis"] = summary["avg_kurtosis"]
    return out

  return jax.jit(fn)


def quantized_metrics(make_model, params, task: BigramBackcopy, float_loss: float,
                      settings: Sequence[str] = QUANT_SETTINGS, calib_batches: int = 8,
                      batch_size: int = 64, probe: np.ndarray | None = None) -> dict:
  """<setting>/{loss, copy_acc, loss_increase} of the fake-quantized model per setting."""
  if probe is None:
    probe = task.batch(PROBE_INDEX, 512)
  trig = task.trigger_mask(probe)
  out = {}
  for name in settings:
    qcfg = QuantConfig(enabled=True, **SETTINGS[name])
    model = make_model(qcfg)
    stats = nn.meta.unbox(model.init(jax.random.key(0), probe[:2])).get(QUANT_STATS, {})
    calib = jax.jit(lambda p, st, x: model.apply({"params": p, QUANT_STATS: st}, x,
                                                 mutable=[QUANT_STATS])[1].get(QUANT_STATS, {}))
    if jax.tree.leaves(stats):
      for i in range(calib_batches):
        stats = calib(params, stats, task.batch(PROBE_INDEX + 1 + i, batch_size))
    logits = jax.jit(lambda p, st, x: model.apply({"params": p, QUANT_STATS: st}, x))(
        params, stats, probe)
    ce = np.asarray(_losses(logits, jnp.asarray(probe)))
    copy = trig[:, :-1]
    ok = np.asarray(jnp.argmax(logits[:, :-1], -1)) == probe[:, 1:]
    out[f"{name}/loss"] = float(ce.mean())
    out[f"{name}/copy_acc"] = float((ok & copy).sum() / max(copy.sum(), 1))
    out[f"{name}/loss_increase"] = float(ce.mean()) - float_loss
  return out


def train_run(preset: str, seed: int, workdir: str, steps: int | None = None,
              eval_every: int = 1000, log=print) -> dict:
  """Train one (preset, seed), measuring every eval_every steps; the result is cached in
  WORKDIR/done.json."""
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  c = study_config(preset)
  if steps is not None:
    c.train.total_steps = steps
  task, make_model = build(c)
  model = make_model()
  tx = optim.make_optimizer(c)
  probe = task.batch(PROBE_INDEX, 512)
  trig = task.trigger_mask(probe)
  params = nn.meta.unbox(model.init(jax.random.key(seed), probe[:2])["params"])
  opt_state = tx.init(params)

  def loss_fn(p, x):
    return jnp.mean(_losses(model.apply({"params": p}, x), x))

  @jax.jit
  def step(p, s, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    upd, s = tx.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  probe_fn = make_probe(model, c.model.depth)
  os.makedirs(workdir, exist_ok=True)
  history = []
  total = c.train.total_steps
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "history.jsonl"), "w") as hist:
    for i in range(total + 1):
      if i % eval_every == 0 or i == total:
        m = {k: float(v) for k, v in probe_fn(params, probe, trig).items()}
        m["step"] = i
        history.append(m)
        hist.write(json.dumps(m) + "\n")
        hist.flush()
        log(f"{preset} seed {seed} step {i}: loss {m['loss']:.3f} copy {m['copy_acc']:.2f} "
            f"| BOS mass dormant L0 {m['L0/bos_mass_dormant']:.2f} L1 "
            f"{m['L1/bos_mass_dormant']:.2f} | L1 |v| BOS {m['L1/value_norm_bos']:.2f} | L1 "
            f"resid BOS {m['L1/resid_norm_bos']:.1f} vs {m['L1/resid_norm_other']:.1f}")
      if i == total:
        break
      # the seed picks the initialisation; every run of a study sees the same batches
      params, opt_state, _ = step(params, opt_state, task.batch(i, c.train.batch_size))
  seconds = time.perf_counter() - t0
  final = dict(history[-1])
  final.update(quantized_metrics(make_model, params, task, final["loss"], probe=probe))
  final["train_seconds"] = seconds
  final["ms_per_step"] = 1e3 * seconds / max(total, 1)
  with open(done, "w") as f:
    json.dump({"final": final, "history": history}, f)
  return {"final": final, "history": history}


TABLE = (
    ("loss", "loss", 1.0), ("copy_acc", "copy acc (%)", 100.0),
    ("L0/bos_mass_dormant", "L0 BOS mass, dormant", 1.0),
    ("L1/bos_mass_dormant", "L1 BOS mass, dormant", 1.0),
    ("L1/bos_mass_active", "L1 BOS mass, active", 1.0),
    ("L1/null_mass", "L1 mass on no key", 1.0),
    ("L1/score_range", "L1 score range", 1.0),
    ("L1/value_norm_bos", "L1 |v| BOS", 1.0), ("L1/value_norm_other", "L1 |v| other", 1.0),
    ("L1/resid_norm_bos", "L1 resid BOS", 1.0), ("L1/resid_norm_other", "L1 resid other", 1.0),
    ("max_inf_norm", "max inf-norm", 1.0), ("avg_kurtosis", "avg kurtosis", 1.0),
)
QUANT_TABLE = tuple((f"{s}/loss_increase", f"{s.upper()} loss increase", 1.0)
                    for s in QUANT_SETTINGS) + tuple(
    (f"{s}/copy_acc", f"{s.upper()} copy acc (%)", 100.0) for s in QUANT_SETTINGS)
WRITERS = (
    ("L0/attn_out_norm_bos", "L0 attn out BOS", 1.0), ("L0/ffn_out_norm_bos", "L0 FFN out BOS", 1.0),
    ("L0/ffn_out_norm_other", "L0 FFN out other", 1.0),
    ("L1/attn_out_norm_bos", "L1 attn out BOS", 1.0), ("L1/ffn_out_norm_bos", "L1 FFN out BOS", 1.0),
    ("L1/ffn_out_norm_other", "L1 FFN out other", 1.0),
    ("L1/resid_absmax_bos", "L1 max abs BOS", 1.0), ("L1/resid_absmax_other", "L1 max abs other", 1.0),
)


def table(finals: Mapping[str, Sequence[Mapping[str, float]]], columns) -> str:
  """Markdown table of the final values, mean +- std over seeds (qtx.metrics.mean_std_table)."""
  from qtx import metrics
  return metrics.mean_std_table(finals, columns, label="remedy")


def plot(histories: Mapping[str, Sequence[Sequence[Mapping[str, float]]]], path: str) -> str:
  """Over training, one line per remedy (mean over seeds): the BOS mass of dormant queries in
  layer 1 (where the sink forms at this size), the layer-1 residual norm at BOS, and the
  layer-1 score range."""
  from qtx.analysis.figures import _new_figure
  fig = _new_figure(13, 3.8)
  keys = (("L1/bos_mass_dormant", "L1 attention on BOS (dormant queries)"),
          ("L1/resid_norm_bos", "L1 residual norm at BOS"),
          ("L1/score_range", "L1 softmax input range"))
  for i, (key, title) in enumerate(keys):
    ax = fig.add_subplot(1, 3, i + 1)
    for name, runs in histories.items():
      if not runs:
        continue
      steps = [m["step"] for m in runs[0]]
      vals = np.mean([[m[key] for m in h[:len(steps)]] for h in runs
                      if len(h) >= len(steps)], axis=0)
      ax.plot(steps, vals, label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
  fig.axes[0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default=",".join(PRESETS))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=15000)
  ap.add_argument("--eval_every", type=int, default=1000)
  ap.add_argument("--workdir", default="runs/backcopy")
  ap.add_argument("--out", default="", help="markdown file of the tables (a .png beside it)")
  a = ap.parse_args(argv)
  presets = [p.strip() for p in a.presets.split(",") if p.strip()]
  bad = [p for p in presets if p not in PRESETS]
  if bad:
    raise SystemExit(f"--presets: unknown {bad}; choose from {PRESETS}")
  seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  finals = {p: [] for p in presets}
  histories = {p: [] for p in presets}
  cmd = "python -m qtx.analysis.backcopy " + " ".join(argv if argv is not None else sys.argv[1:])
  for seed in seeds:
    for p in presets:
      r = train_run(p, seed, os.path.join(a.workdir, p, f"seed{seed}"), a.steps, a.eval_every)
      finals[p].append(r["final"])
      histories[p].append(r["history"])
      if a.out:
        fig = plot(histories, os.path.splitext(a.out)[0] + ".png")
        with open(a.out, "w") as f:
          f.write(f"Command: `{cmd}`\n\nFinal values at step {a.steps}, mean ± std over the "
                  f"seeds in the 'seeds' column.\n\n### Mechanism\n\n{table(finals, TABLE)}\n\n"
                  f"### Quantization (probe set)\n\n{table(finals, QUANT_TABLE)}\n\n"
                  f"### What writes the BOS residual\n\n{table(finals, WRITERS)}\n\n"
                  f"![backcopy]({os.path.basename(fig)})\n")
  print(table(finals, TABLE))
  print(table(finals, QUANT_TABLE))
  return finals


if __name__ == "__main__":
  from qtx import hostmem
  hostmem.maybe_reuse_freed_memory()  # a CPU study: as python -m qtx.main does
  main()
