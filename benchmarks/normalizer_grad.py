"""Softplus attention's written-out gradient against JAX autodiff of the same forward.

  python -m benchmarks.normalizer_grad                 # normalizer forward+backward alone
  python -m benchmarks.normalizer_grad --train-step    # and the tiny config's whole train step

`qtx.nn.normalizers.softplus_reweight` carries a hand-written VJP; `plain_softplus_reweight` is
the same forward computation differentiated by JAX. Part 1 times jit(value_and_grad) of both on the tiny
config's attention shapes (image: 128 x 4 heads x 65 x 65, unmasked; text: 128 x 4 x 20 x 20,
causal). Part 2 (`--train-step`) times the tiny config's whole train step with softplus
attention twice: as shipped, and with autodiff swapped in.
Rows are measured in the same process in alternating order (A, B, A, B) and each figure is the
median over the rounds; the ratio column is plain time / written-out time (> 1: faster). The
last row puts the softmax train step in the second column, for scale.
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import time_fn
from qtx.nn import normalizers as N
from qtx.nn.normalizers.softplus import autodiff_gradients


plain_gradients = autodiff_gradients


def normalizer_rows(iters: int, rounds: int):
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(128, 4, 65, 65)) * 3, jnp.float32)
  text = jnp.asarray(rng.normal(size=(128, 4, 20, 20)) * 3, jnp.float32)
  causal = jnp.asarray(np.tril(np.ones((20, 20), bool)))
  cases = [
      ("softplus p=1, image", lambda x: N.softplus_reweight(x, p=1.0), image),
      ("softplus p=1, text causal", lambda x: N.softplus_reweight(x, where=causal, p=1.0), text),
      ("softplus p=15, image", lambda x: N.softplus_reweight(x, p=15.0), image),
  ]
  rows = []
  for name, f, x in cases:
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    loss = lambda x, f=f, cot=cot: jnp.sum(f(x) * cot)
    written = jax.jit(jax.value_and_grad(loss))
    with plain_gradients():
      plain = jax.jit(jax.value_and_grad(loss)).lower(x).compile()
    written = written.lower(x).compile()
    t_w, t_p = [], []
    for _ in range(rounds):
      t_w.append(time_fn(written, x, iters=iters))
      t_p.append(time_fn(plain, x, iters=iters))
    rows.append((name, statistics.median(t_w), statistics.median(t_p)))
  return rows


def train_step_rows(steps: int, rounds: int, config_path: str):
  from benchmarks.train_step import load_config, measure
  t_w, t_p, t_s = [], [], []
  for _ in range(rounds):
    t_w.append(measure(load_config(f"{config_path}:softplus"), steps)["step_s"])
    with plain_gradients():
      t_p.append(measure(load_config(f"{config_path}:softplus"), steps)["step_s"])
    t_s.append(measure(load_config(f"{config_path}:softmax"), steps)["step_s"])
  return [("train step, softplus", statistics.median(t_w), statistics.median(t_p)),
          ("train step, softmax (ref.)", statistics.median(t_w), statistics.median(t_s))]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--iters", type=int, default=20, help="timed calls per round (part 1)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--train-step", action="store_true", help="also time whole train steps")
  p.add_argument("--steps", type=int, default=15, help="timed train steps per round (part 2)")
  p.add_argument("--config", default="configs/clip_tiny.py")
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()} | device {dev.device_kind} x {jax.device_count()}")
  rows = normalizer_rows(args.iters, args.rounds)
  if args.train_step:
    rows += train_step_rows(args.steps, args.rounds, args.config)
  print(f"{'case':30s} {'written-out ms':>15s} {'plain autodiff ms':>18s} {'ratio':>7s}")
  for name, t_w, t_p in rows:
    print(f"{name:30s} {t_w * 1e3:15.2f} {t_p * 1e3:18.2f} {t_p / t_w:6.2f}x")


if __name__ == "__main__":
  main()
