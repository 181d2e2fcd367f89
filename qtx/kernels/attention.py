"""Two-pass fused multi-head attention with softmax, clipped softmax, softmax with a sink logit
or softplus attention with re-weighting, as Pallas kernels.

A sink logit b (softmax_sink) is one more term of each row's normaliser, exp(b) with no value:
pass 1 starts its (max, sum) accumulator from (b, 1) instead of (-inf, 0), and the rest is
softmax's; its gradient is d b_i = -p_sink,i D_i with p_sink,i = exp(b - lse_i).

The clipped softmax (Bondarenko et al. 2023, eq. 4) clip((zeta - gamma) * P + gamma, 0, 1) needs
each row's full softmax normaliser before any probability can be clipped, so the online rescaling
of FlashAttention does not apply. Per block of queries:

- Pass 1 runs over key blocks and folds q.k into the row's running (max, sum) in base 2, giving
  the row's log-normaliser lse (the Dukhan & Ablavatski / online-softmax accumulator).
- Pass 2 runs over key blocks again, forms P = exp2(s - lse), clips it when gamma is given,
  masks it, and accumulates P.V. The T x S matrix never exists in memory.

The backward pass recomputes P from the saved lse (FlashAttention-style) in two kernels:
- per query block: D_i = sum_j P_ij dA'_ij (dA = dO.V^T; dA' = (zeta - gamma) dA on entries where
  the clip is not active, 0 elsewhere; without clipping D_i = dO_i . O_i), the per-row gradient of
  gamma, and dQ = scale * sum_j P (dA' - D) K;
- per key block: dV = sum_i A^T dO (A the clipped weights) and dK = scale * sum_i (P (dA' - D))^T Q.

Under a mesh (jax.set_mesh) each device runs the kernels on its own batch and head shard
(qtx.kernels.sharding).

Masks: causal (query i sees keys j <= i) and key padding (True = valid key). Fully masked rows
give zeros and zero gradients.

Layouts: on GPU (Pallas Triton) and in interpret mode the kernels read B x T x H x K directly, with
power-of-two blocks and bounds-masked loads; on TPU (Mosaic) inputs are transposed to
B x H x T x K and padded to whole blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtx.kernels import sharding
from qtx.kernels import platforms as target_lib
from qtx.kernels import softmax as _sm

Array = jax.Array
LOG2E = _sm.LOG2E
_FULL = (slice(None), slice(None))


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Block sizes and layout of the attention kernels. Hashable (a custom_vjp static argument)."""
  platform: str
  interpret: bool
  block_q: int
  block_k: int
  head_block: int     # K padded to a power of two >= 16 (Triton), or K (Mosaic)
  masked: bool        # bounds-masked loads on B x T x H x K, vs padded B x H x T x K blocks
  num_warps: int = 4
  num_stages: int = 2


def make_plan(T: int, S: int, K: int, interpret: Optional[bool] = None,
              platform: Optional[str] = None, block_q: Optional[int] = None,
              block_k: Optional[int] = None) -> AttentionPlan:
  """Per-backend block sizes: GPU up to 64 x 64 (16 at least, for the tensor-core dots), TPU
  128 x 128, CPU (interpret) up to 32 x 32 so that several blocks are exercised."""
  platform, interpret = _sm.resolve_platform(interpret, platform)
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b is not None and (b < 16 or b & (b - 1)):
      raise ValueError(f"{name} must be a power of two >= 16, got {b}")
  if platform == "tpu":
    return AttentionPlan(platform, interpret, block_q or 128, block_k or 128, K, masked=False)
  cap = 64 if platform == "gpu" else 32
  bq = block_q or _seq_block(T, cap)
  bk = block_k or _seq_block(S, cap)
  head = max(16, _sm.next_pow2(K))
  return AttentionPlan(platform, interpret, bq, bk, head, masked=True,
                       num_warps=4 if head <= 64 else 8)


def _seq_block(n: int, cap: int) -> int:
  """The largest power-of-two block in [16, cap] that pads n by at most 25% (T = 197 -> 32,
  T = 77 -> 32, T = 1024 -> 64), else 16."""
  b = min(cap, max(16, _sm.next_pow2(n)))
  while b > 16 and pl.cdiv(n, b) * b > 1.25 * n:
    b //= 2
  return b


@dataclasses.dataclass(frozen=True)
class _Static:
  plan: AttentionPlan
  T: int
  S: int
  K: int
  causal: bool
  scale: float
  zeta: float
  softplus_p: float = 1.0
  softplus_eps: float = 1e-6


# ----------------------------------------------------------------------------------------------
# Kernel building blocks. Refs seen by the kernels are 2-D: (sequence block, head_block) for
# q/k/v/o, (sequence block, 1) for per-row statistics, (1, key block) for the key mask.


def _dot_nt(a, b):
  """a @ b^T in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a^T @ b in float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


class _Tiles:
  """Index arithmetic for one (query block, key block) tile."""

  def __init__(self, st: _Static, km_ref):
    self.st = st
    self.plan = st.plan
    self.km_ref = km_ref
    self.col_ok = lax.broadcasted_iota(jnp.int32, (1, st.plan.head_block), 1) < st.K

  def rows(self, start, size, limit):
    """(index, row ids (size x 1), in-bounds (size x 1)) for rows [start, start + size)."""
    ids = start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    return (pl.ds(start, size), slice(None)), ids, ids < limit

  def load_rows(self, ref, idx, ok, dtype=None):
    x = _sm.load(ref, idx, ok & self.col_ok, 0.0, self.plan.masked)
    return x if dtype is None else x.astype(dtype)

  def load_stat(self, ref, idx, ok, other):
    return _sm.load(ref, idx, ok, other, self.plan.masked)

  def valid(self, q_ids, q_ok, k_start, km_start=None):
    """Mask of the tile: in bounds, valid key, causal.

    k_start: first key of the tile; km_start: its offset in km_ref (default k_start, when the
    key-mask block holds the whole sequence).
    """
    bk = self.plan.block_k
    km_start = k_start if km_start is None else km_start
    k_ids = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_ok = k_ids < self.st.S
    valid = q_ok & k_ok
    if self.km_ref is not None:
      km = _sm.load(self.km_ref, (slice(None), pl.ds(km_start, bk)), k_ok, 0, self.plan.masked)
      valid = valid & (km != 0)
    if self.st.causal:
      valid = valid & (k_ids <= q_ids)
    return valid

  def probs(self, q, k, valid, lse):
    """P = exp2(s - lse) on valid entries (s = scale * log2(e) * q.k), else 0."""
    s = _dot_nt(q, k) * (self.st.scale * LOG2E)
    return jnp.where(valid, jnp.exp2(s - lse), 0.0)


def _clip(p, gamma, zeta, valid):
  return jnp.where(valid, jnp.clip((zeta - gamma) * p + gamma, 0.0, 1.0), 0.0)


def _effective_grad(p, da, gamma, zeta, valid, clip):
  """(dA', active): the upstream gradient through the clip, zero where the clip is active."""
  if not clip:
    return da, valid
  a = (zeta - gamma) * p + gamma
  active = valid & (a > 0.0) & (a < 1.0)
  return jnp.where(active, (zeta - gamma) * da, 0.0), active


def _n_key_blocks(st: _Static, q_end):
  """Key blocks a query block ending (exclusively) at q_end needs to visit."""
  bk = st.plan.block_k
  n = pl.cdiv(st.S, bk)
  if st.causal and st.plan.masked:  # Mosaic path: static trip counts, the mask does the rest
    return lax.div(jnp.minimum(q_end, st.S) + bk - 1, bk)
  return n


def _loop(n, body, init):
  if isinstance(n, int):
    return _sm.chunk_loop(n, body, init) if n > 0 else init
  return lax.fori_loop(0, n, body, init)


def _forward_kernel(*refs, st: _Static, has_mask: bool, clip: bool, sink: bool = False):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  km_ref = refs.pop(0) if has_mask else None
  gamma_ref = refs.pop(0) if clip else None
  sink_ref = refs.pop(0) if sink else None
  o_ref, lse_ref = refs
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  q_idx, q_ids, q_ok = tiles.rows(pl.program_id(2) * bq, bq, st.T)
  q = tiles.load_rows(q_ref, _FULL, q_ok)
  gamma = tiles.load_stat(gamma_ref, _FULL, q_ok, 0.0) if clip else None
  n_kb = _n_key_blocks(st, pl.program_id(2) * bq + bq)

  def keys(j):
    k_idx, _, k_ok = tiles.rows(j * bk, bk, st.S)
    return k_idx, k_ok

  def pass1(j, acc):
    m, l = acc
    k_idx, k_ok = keys(j)
    k = tiles.load_rows(k_ref, k_idx, k_ok)
    valid = tiles.valid(q_ids, q_ok, j * bk)
    s = jnp.where(valid, _dot_nt(q, k) * (st.scale * LOG2E), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(valid, jnp.exp2(s - m_ref), 0.0)
    return m_new, l * jnp.exp2(m - m_ref) + jnp.sum(p, axis=1, keepdims=True)

  if sink:
    # the sink logit is one more term of the normaliser: (m, l) start from (b, 1) in base 2
    b2 = tiles.load_stat(sink_ref, _FULL, q_ok, -jnp.inf) * LOG2E
    init = (b2, jnp.where(b2 == -jnp.inf, 0.0, 1.0))
  else:
    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
  m, l = _loop(n_kb, pass1, init)
  lse = jnp.where(l > 0.0, m + jnp.log2(jnp.where(l > 0.0, l, 1.0)), jnp.inf)

  def pass2(j, acc):
    k_idx, k_ok = keys(j)
    k = tiles.load_rows(k_ref, k_idx, k_ok)
    v = tiles.load_rows(v_ref, k_idx, k_ok)
    valid = tiles.valid(q_ids, q_ok, j * bk)
    p = tiles.probs(q, k, valid, lse)
    if clip:
      p = _clip(p, gamma, st.zeta, valid)
    return acc + _dot_nn(p.astype(v.dtype), v)

  acc = _loop(n_kb, pass2, jnp.zeros((bq, plan.head_block), jnp.float32))
  _sm.store(o_ref, _FULL, acc, q_ok & tiles.col_ok, plan.masked)
  _sm.store(lse_ref, _FULL, lse, q_ok, plan.masked)


def _dq_kernel(*refs, st: _Static, has_mask: bool, clip: bool, sink: bool = False):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  km_ref = refs.pop(0) if has_mask else None
  gamma_ref = refs.pop(0) if clip else None
  sink_ref = refs.pop(0) if sink else None
  lse_ref, do_ref = refs[:2]
  del refs[:2]
  o_ref = None if clip else refs.pop(0)
  dq_ref, delta_ref = refs[:2]
  dgamma_ref = refs[2] if clip else None
  dsink_ref = refs[2] if sink else None
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  _, q_ids, q_ok = tiles.rows(pl.program_id(2) * bq, bq, st.T)
  q = tiles.load_rows(q_ref, _FULL, q_ok)
  do = tiles.load_rows(do_ref, _FULL, q_ok)
  lse = tiles.load_stat(lse_ref, _FULL, q_ok, jnp.inf)
  gamma = tiles.load_stat(gamma_ref, _FULL, q_ok, 0.0) if clip else None
  n_kb = _n_key_blocks(st, pl.program_id(2) * bq + bq)

  def tile(j):
    k_idx, _, k_ok = tiles.rows(j * bk, bk, st.S)
    k = tiles.load_rows(k_ref, k_idx, k_ok)
    v = tiles.load_rows(v_ref, k_idx, k_ok)
    valid = tiles.valid(q_ids, q_ok, j * bk)
    p = tiles.probs(q, k, valid, lse)
    da = _dot_nt(do, v)
    da_eff, active = _effective_grad(p, da, gamma, st.zeta, valid, clip)
    return k, p, da, da_eff, active

  zeros = jnp.zeros((bq, 1), jnp.float32)
  if clip:
    def pass_delta(j, acc):
      delta, dgam = acc
      _, p, da, da_eff, active = tile(j)
      delta = delta + jnp.sum(da_eff * p, axis=1, keepdims=True)
      dgam = dgam + jnp.sum(jnp.where(active, da * (1.0 - p), 0.0), axis=1, keepdims=True)
      return delta, dgam

    delta, dgam = _loop(n_kb, pass_delta, (zeros, zeros))
  else:
    o = tiles.load_rows(o_ref, _FULL, q_ok, jnp.float32)
    delta = jnp.sum(o * do.astype(jnp.float32), axis=1, keepdims=True)

  def pass_dq(j, acc):
    k, p, _, da_eff, _ = tile(j)
    ds = p * (da_eff - delta)
    return acc + _dot_nn(ds.astype(k.dtype), k)

  dq = _loop(n_kb, pass_dq, jnp.zeros((bq, plan.head_block), jnp.float32)) * st.scale
  _sm.store(dq_ref, _FULL, dq, q_ok & tiles.col_ok, plan.masked)
  _sm.store(delta_ref, _FULL, delta, q_ok, plan.masked)
  if clip:
    _sm.store(dgamma_ref, _FULL, dgam, q_ok, plan.masked)
  if sink:
    # the sink has no value: d b_i = p_sink,i (0 - D_i), p_sink = exp2(b * log2(e) - lse)
    b2 = tiles.load_stat(sink_ref, _FULL, q_ok, -jnp.inf) * LOG2E
    p_sink = jnp.where(lse < jnp.inf, jnp.exp2(b2 - lse), 0.0)
    _sm.store(dsink_ref, _FULL, -p_sink * delta, q_ok, plan.masked)


def _dkdv_kernel(*refs, st: _Static, has_mask: bool, clip: bool, sink: bool = False):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  del refs[:3]
  km_ref = refs.pop(0) if has_mask else None
  gamma_ref = refs.pop(0) if clip else None
  if sink:  # P comes from the saved lse, which holds the sink already
    refs.pop(0)
  lse_ref, do_ref, delta_ref, dk_ref, dv_ref = refs
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  k_start = pl.program_id(2) * bk
  _, _, k_ok = tiles.rows(k_start, bk, st.S)
  k = tiles.load_rows(k_ref, _FULL, k_ok)
  v = tiles.load_rows(v_ref, _FULL, k_ok)
  n_qb = pl.cdiv(st.T, bq)
  first = 0
  if st.causal and plan.masked:
    first = lax.div(k_start, bq)  # earlier query blocks see none of these keys

  def body(i, acc):
    dk, dv = acc
    q_idx, q_ids, q_ok = tiles.rows((first + i) * bq, bq, st.T)
    q = tiles.load_rows(q_ref, q_idx, q_ok)
    do = tiles.load_rows(do_ref, q_idx, q_ok)
    lse = tiles.load_stat(lse_ref, q_idx, q_ok, jnp.inf)
    delta = tiles.load_stat(delta_ref, q_idx, q_ok, 0.0)
    valid = tiles.valid(q_ids, q_ok, k_start, km_start=0)
    p = tiles.probs(q, k, valid, lse)
    if clip:
      gamma = tiles.load_stat(gamma_ref, q_idx, q_ok, 0.0)
      a = _clip(p, gamma, st.zeta, valid)
    else:
      gamma, a = None, p
    dv = dv + _dot_tn(a.astype(do.dtype), do)
    da_eff, _ = _effective_grad(p, _dot_nt(do, v), gamma, st.zeta, valid, clip)
    ds = p * (da_eff - delta)
    dk = dk + _dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((bk, plan.head_block), jnp.float32)
  n = n_qb if isinstance(first, int) else n_qb - first
  dk, dv = _loop(n, body, (zeros, zeros))
  _sm.store(dk_ref, _FULL, dk * st.scale, k_ok & tiles.col_ok, plan.masked)
  _sm.store(dv_ref, _FULL, dv, k_ok & tiles.col_ok, plan.masked)


# ----------------------------------------------------------------------------------------------
# Softplus attention with re-weighting (Gao & Spratling 2025): S = softplus(s) on the visible
# keys, A = S / (sum S + eps), R = N A - O, weights = relu(R)^p / sum relu(R)^p, computed as a
# softmax over p log R on the entries with R > 0 (so large p cannot overflow). Pass 1 sums S;
# pass 2 is an online softmax over p log R (its max rescaling is exact here, since A is fixed
# once sum S is known) accumulating the weights times V. Scores s = row_scale * q.k with the
# per-row scale log(d) log(N_i) and q, k already L2-normalised by the caller.
# Backward (the written-out VJP of qtx.nn.normalizers.softplus_reweight): with g = dO V^T,
# D = dO . O (= sum_j y g), dR = p y / R (g - D) on R > 0, E = sum_j dR A, dS = N / (sum S + eps) (dR - E)
# sigmoid(s) on visible keys; dq = row_scale dS K, dk = (row_scale dS)^T Q, dv = y^T dO.


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


class _SoftplusRows:
  """The per-row quantities of one (query block, key block) tile."""

  def __init__(self, st, q, k, valid, rs, n, den):
    self.s = _dot_nt(q, k) * rs
    self.sp = jnp.where(valid, _softplus(self.s), 0.0)
    self.a = self.sp / den
    self.r = n * self.a - jnp.where(n <= 1.0, 0.0, 1.0)
    self.pos = valid & (self.r > 0.0)
    self.logit = jnp.where(self.pos, st.softplus_p * jnp.log(jnp.where(self.pos, self.r, 1.0)),
                           -jnp.inf)

  def weights(self, lse):
    return jnp.where(self.pos, jnp.exp(self.logit - lse), 0.0)

  def ds(self, st, y, g, D, E, valid, n, den):
    dr = jnp.where(self.pos, st.softplus_p * y / jnp.where(self.pos, self.r, 1.0) * (g - D), 0.0)
    sig = 1.0 / (1.0 + jnp.exp(-self.s))
    return dr, jnp.where(valid, n / den * (dr - E) * sig, 0.0)


def _sp_forward_kernel(q_ref, k_ref, v_ref, *refs, st: _Static, has_mask: bool):
  refs = list(refs)
  km_ref = refs.pop(0) if has_mask else None
  rs_ref, n_ref, o_ref, den_ref, lse_ref = refs
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  _, q_ids, q_ok = tiles.rows(pl.program_id(2) * bq, bq, st.T)
  q = tiles.load_rows(q_ref, _FULL, q_ok)
  rs = tiles.load_stat(rs_ref, _FULL, q_ok, 0.0)
  n = tiles.load_stat(n_ref, _FULL, q_ok, 0.0)
  n_kb = _n_key_blocks(st, pl.program_id(2) * bq + bq)

  def tile(j):
    k_idx, _, k_ok = tiles.rows(j * bk, bk, st.S)
    return k_idx, k_ok, tiles.valid(q_ids, q_ok, j * bk)

  def pass1(j, z):
    k_idx, k_ok, valid = tile(j)
    s = _dot_nt(q, tiles.load_rows(k_ref, k_idx, k_ok)) * rs
    return z + jnp.sum(jnp.where(valid, _softplus(s), 0.0), axis=1, keepdims=True)

  den = _loop(n_kb, pass1, jnp.zeros((bq, 1), jnp.float32)) + st.softplus_eps

  def pass2(j, acc):
    m, l, o = acc
    k_idx, k_ok, valid = tile(j)
    k = tiles.load_rows(k_ref, k_idx, k_ok)
    v = tiles.load_rows(v_ref, k_idx, k_ok)
    t = _SoftplusRows(st, q, k, valid, rs, n, den)
    m_new = jnp.maximum(m, jnp.max(t.logit, axis=1, keepdims=True))
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    e = jnp.where(t.pos, jnp.exp(t.logit - m_ref), 0.0)
    alpha = jnp.exp(m - m_ref)
    return (m_new, l * alpha + jnp.sum(e, axis=1, keepdims=True),
            o * alpha + _dot_nn(e.astype(v.dtype), v))

  init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, plan.head_block), jnp.float32))
  m, l, o = _loop(n_kb, pass2, init)
  out = o / jnp.where(l > 0.0, l, 1.0)
  lse = jnp.where(l > 0.0, m + jnp.log(jnp.where(l > 0.0, l, 1.0)), jnp.inf)
  _sm.store(o_ref, _FULL, out, q_ok & tiles.col_ok, plan.masked)
  _sm.store(den_ref, _FULL, den, q_ok, plan.masked)
  _sm.store(lse_ref, _FULL, lse, q_ok, plan.masked)


def _sp_dq_kernel(q_ref, k_ref, v_ref, *refs, st: _Static, has_mask: bool):
  refs = list(refs)
  km_ref = refs.pop(0) if has_mask else None
  rs_ref, n_ref, den_ref, lse_ref, do_ref, o_ref, dq_ref, d_ref, e_ref = refs
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  _, q_ids, q_ok = tiles.rows(pl.program_id(2) * bq, bq, st.T)
  q = tiles.load_rows(q_ref, _FULL, q_ok)
  do = tiles.load_rows(do_ref, _FULL, q_ok)
  rs = tiles.load_stat(rs_ref, _FULL, q_ok, 0.0)
  n = tiles.load_stat(n_ref, _FULL, q_ok, 0.0)
  den = tiles.load_stat(den_ref, _FULL, q_ok, 1.0)
  lse = tiles.load_stat(lse_ref, _FULL, q_ok, jnp.inf)
  o = tiles.load_rows(o_ref, _FULL, q_ok, jnp.float32)
  D = jnp.sum(o * do.astype(jnp.float32), axis=1, keepdims=True)
  n_kb = _n_key_blocks(st, pl.program_id(2) * bq + bq)

  def tile(j):
    k_idx, _, k_ok = tiles.rows(j * bk, bk, st.S)
    k = tiles.load_rows(k_ref, k_idx, k_ok)
    v = tiles.load_rows(v_ref, k_idx, k_ok)
    valid = tiles.valid(q_ids, q_ok, j * bk)
    t = _SoftplusRows(st, q, k, valid, rs, n, den)
    return k, t, t.weights(lse), _dot_nt(do, v), valid

  def pass_e(j, E):
    _, t, y, g, valid = tile(j)
    dr, _ = t.ds(st, y, g, D, 0.0, valid, n, den)
    return E + jnp.sum(dr * t.a, axis=1, keepdims=True)

  E = _loop(n_kb, pass_e, jnp.zeros((bq, 1), jnp.float32))

  def pass_dq(j, acc):
    k, t, y, g, valid = tile(j)
    _, ds = t.ds(st, y, g, D, E, valid, n, den)
    return acc + _dot_nn(ds.astype(k.dtype), k)

  dq = _loop(n_kb, pass_dq, jnp.zeros((bq, plan.head_block), jnp.float32)) * rs
  _sm.store(dq_ref, _FULL, dq, q_ok & tiles.col_ok, plan.masked)
  _sm.store(d_ref, _FULL, D, q_ok, plan.masked)
  _sm.store(e_ref, _FULL, E, q_ok, plan.masked)


def _sp_dkdv_kernel(q_ref, k_ref, v_ref, *refs, st: _Static, has_mask: bool):
  refs = list(refs)
  km_ref = refs.pop(0) if has_mask else None
  rs_ref, n_ref, den_ref, lse_ref, do_ref, d_ref, e_ref, dk_ref, dv_ref = refs
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  tiles = _Tiles(st, km_ref)
  k_start = pl.program_id(2) * bk
  _, _, k_ok = tiles.rows(k_start, bk, st.S)
  k = tiles.load_rows(k_ref, _FULL, k_ok)
  v = tiles.load_rows(v_ref, _FULL, k_ok)
  n_qb = pl.cdiv(st.T, bq)
  first = 0
  if st.causal and plan.masked:
    first = lax.div(k_start, bq)

  def body(i, acc):
    dk, dv = acc
    q_idx, q_ids, q_ok = tiles.rows((first + i) * bq, bq, st.T)
    q = tiles.load_rows(q_ref, q_idx, q_ok)
    do = tiles.load_rows(do_ref, q_idx, q_ok)
    stat = lambda ref, other: tiles.load_stat(ref, q_idx, q_ok, other)
    rs, n, den = stat(rs_ref, 0.0), stat(n_ref, 0.0), stat(den_ref, 1.0)
    lse, D, E = stat(lse_ref, jnp.inf), stat(d_ref, 0.0), stat(e_ref, 0.0)
    valid = tiles.valid(q_ids, q_ok, k_start, km_start=0)
    t = _SoftplusRows(st, q, k, valid, rs, n, den)
    y = t.weights(lse)
    dv = dv + _dot_tn(y.astype(do.dtype), do)
    _, ds = t.ds(st, y, _dot_nt(do, v), D, E, valid, n, den)
    dk = dk + _dot_tn((ds * rs).astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((bk, plan.head_block), jnp.float32)
  n = n_qb if isinstance(first, int) else n_qb - first
  dk, dv = _loop(n, body, (zeros, zeros))
  _sm.store(dk_ref, _FULL, dk, k_ok & tiles.col_ok, plan.masked)
  _sm.store(dv_ref, _FULL, dv, k_ok & tiles.col_ok, plan.masked)


# ----------------------------------------------------------------------------------------------
# Layouts, BlockSpecs and pallas_calls.


def _padded_len(n, block):
  return pl.cdiv(n, block) * block


def _seq_in(x_BxTxHxK, plan: AttentionPlan, block: int):
  """Kernel layout of a B x T x H x K array: unchanged (masked) or B x H x Tpad x K (padded)."""
  if plan.masked:
    return x_BxTxHxK
  x = jnp.swapaxes(x_BxTxHxK, 1, 2)
  T = x.shape[2]
  return jnp.pad(x, ((0, 0), (0, 0), (0, _padded_len(T, block) - T), (0, 0)))


def _seq_out(x, T: int, plan: AttentionPlan):
  return x if plan.masked else jnp.swapaxes(x[:, :, :T], 1, 2)


def _rows_in(x_BxHxTx1, plan: AttentionPlan, block: int):
  if plan.masked:
    return x_BxHxTx1
  T = x_BxHxTx1.shape[2]
  return jnp.pad(x_BxHxTx1, ((0, 0), (0, 0), (0, _padded_len(T, block) - T), (0, 0)))


def _rows_out(x, T: int, plan: AttentionPlan):
  return x if plan.masked else x[:, :, :T]


def _km_in(km_Bx1xS, plan: AttentionPlan):
  if plan.masked or km_Bx1xS is None:
    return km_Bx1xS
  S = km_Bx1xS.shape[2]
  return jnp.pad(km_Bx1xS, ((0, 0), (0, 0), (0, _padded_len(S, plan.block_k) - S)))


def _seq_spec(plan: AttentionPlan, rows: int, blocked: bool):
  """Spec of a q/k/v-like array: block `rows` at grid index i (blocked) or the whole sequence."""
  pick = (lambda i: i) if blocked else (lambda i: 0)
  if plan.masked:
    return pl.BlockSpec((None, rows, None, plan.head_block), lambda b, h, i: (b, pick(i), h, 0))
  return pl.BlockSpec((None, None, rows, plan.head_block), lambda b, h, i: (b, h, pick(i), 0))


def _row_spec(rows: int, blocked: bool):
  pick = (lambda i: i) if blocked else (lambda i: 0)
  return pl.BlockSpec((None, None, rows, 1), lambda b, h, i: (b, h, pick(i), 0))


def _km_spec(cols: int, blocked: bool):
  pick = (lambda i: i) if blocked else (lambda i: 0)
  return pl.BlockSpec((None, 1, cols), lambda b, h, i: (b, 0, pick(i)))


# Per visited (query block, key block) tile: block matmuls (2 bq bk head_block FLOPs each) and
# transcendentals per score, counted from each kernel's loops. The softmax-family forward runs
# QK^T in pass 1 and QK^T, PV in pass 2 (an exp2 in each); its dQ kernel recomputes P and dO V^T
# and adds dS K (with clipping a first pass over the keys does P and dO V^T once more for D); its
# dK dV kernel does QK^T, P^T dO, dO V^T, dS^T Q. The softplus kernels have the same matmuls and
# a softplus (exp + log) besides the exp of each score.
TILE_COST = {
    "two_pass_attention_fwd": (3, 2),
    "two_pass_attention_bwd_dq": (3, 1),
    "two_pass_attention_bwd_dq_clip": (5, 2),
    "two_pass_attention_bwd_dkdv": (4, 1),
    "softplus_attention_fwd": (3, 6),
    "softplus_attention_bwd_dq": (5, 6),
    "softplus_attention_bwd_dkdv": (4, 3),
}


def visited_tiles(st: _Static, key_major: bool = False) -> int:
  """(query block, key block) tiles one (batch, head) visits: all of them, or, causal on the
  masked (GPU / interpreter) layout, those the loops reach: per query block the key blocks up to
  its last row (per key block in the dK dV kernel: the query blocks from its first key on)."""
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  nq, nk = -(-st.T // bq), -(-st.S // bk)
  if not (st.causal and plan.masked):
    return nq * nk
  if key_major:
    return sum(nq - (j * bk) // bq for j in range(nk))
  return sum(-(-min((i + 1) * bq, st.S) // bk) for i in range(nq))


def cost_estimate(st: _Static, name: str, B: int, H: int, args, out_shape,
                  clip: bool = False) -> pl.CostEstimate:
  """The pl.CostEstimate of one attention pallas_call: TILE_COST x the visited tiles for FLOPs
  and transcendentals; bytes = every operand read once + every result written once."""
  key = f"{name}_clip" if clip and f"{name}_clip" in TILE_COST else name
  mm, tr = TILE_COST[key]
  plan = st.plan
  tiles = B * H * visited_tiles(st, key_major=name.endswith("dkdv"))
  scores = tiles * plan.block_q * plan.block_k
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(args))
  nbytes += sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in out_shape)
  return pl.CostEstimate(flops=int(mm * 2 * scores * plan.head_block),
                         transcendentals=int(tr * scores), bytes_accessed=int(nbytes))


def _pallas(kernel, st: _Static, grid, in_specs, out_specs, out_shape, name, args=(),
            clip: bool = False):
  plan = st.plan
  B, H = grid[0], grid[1]
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=plan.interpret, name=name,
      cost_estimate=cost_estimate(st, name, B, H, args, out_shape, clip),
      compiler_params=_sm.compiler_params(plan.platform, plan.interpret, plan.num_warps,
                                          plan.num_stages,
                                          semantics=("parallel", "parallel", "parallel")))


def _common_inputs(st: _Static, q, k, v, km, rows, q_blocked: bool):
  """Kernel-layout q, k, v, key mask and the per-row arrays `rows` (B x H x T x 1 each: gamma,
  sink, softplus statistics; None entries are skipped), with their specs (q or k blocked)."""
  plan = st.plan
  bq, bk = plan.block_q, plan.block_k
  Tb, Sb = _padded_len(st.T, bq), _padded_len(st.S, bk)
  args = [_seq_in(q, plan, bq), _seq_in(k, plan, bk), _seq_in(v, plan, bk)]
  specs = [_seq_spec(plan, bq if q_blocked else Tb, q_blocked),
           _seq_spec(plan, Sb if q_blocked else bk, not q_blocked),
           _seq_spec(plan, Sb if q_blocked else bk, not q_blocked)]
  if km is not None:
    args.append(_km_in(km, plan))
    specs.append(_km_spec(Sb if q_blocked else bk, not q_blocked))
  for r in rows:
    if r is not None:
      args.append(_rows_in(r, plan, bq))
      specs.append(_row_spec(bq if q_blocked else Tb, q_blocked))
  return args, specs


def _seq_shape(st: _Static, B, H, n, dtype):
  if st.plan.masked:
    return jax.ShapeDtypeStruct((B, n, H, st.K), dtype)
  return jax.ShapeDtypeStruct((B, H, n, st.K), dtype)


def _forward(st: _Static, q, k, v, km, gamma, sink=None):
  """(out B x T x H x K, lse B x H x T x 1 in base 2)."""
  plan = st.plan
  B, _, H, _ = q.shape
  bq = plan.block_q
  Tk = st.T if plan.masked else _padded_len(st.T, bq)
  args, in_specs = _common_inputs(st, q, k, v, km, (gamma, sink), q_blocked=True)
  kernel = functools.partial(_forward_kernel, st=st, has_mask=km is not None,
                             clip=gamma is not None, sink=sink is not None)
  out, lse = _pallas(
      kernel, st, (B, H, pl.cdiv(Tk, bq)), in_specs,
      [_seq_spec(plan, bq, True), _row_spec(bq, True)],
      [_seq_shape(st, B, H, Tk, q.dtype), jax.ShapeDtypeStruct((B, H, Tk, 1), jnp.float32)],
      "two_pass_attention_fwd", args)(*args)
  return _seq_out(out, st.T, plan), _rows_out(lse, st.T, plan)


def _backward(st: _Static, q, k, v, km, gamma, out, lse, do, sink=None):
  plan = st.plan
  B, _, H, _ = q.shape
  bq, bk = plan.block_q, plan.block_k
  clip = gamma is not None
  has_sink = sink is not None
  Tk = st.T if plan.masked else _padded_len(st.T, bq)
  Sk = st.S if plan.masked else _padded_len(st.S, bk)
  Tb = _padded_len(st.T, bq)
  lse_k = _rows_in(lse, plan, bq)
  do_k = _seq_in(do, plan, bq)
  row = jax.ShapeDtypeStruct((B, H, Tk, 1), jnp.float32)

  args, in_specs = _common_inputs(st, q, k, v, km, (gamma, sink), q_blocked=True)
  args += [lse_k, do_k]
  in_specs += [_row_spec(bq, True), _seq_spec(plan, bq, True)]
  if not clip:
    args.append(_seq_in(out, plan, bq))
    in_specs.append(_seq_spec(plan, bq, True))
  extra = int(clip) + int(has_sink)
  out_shape = [_seq_shape(st, B, H, Tk, q.dtype), row] + [row] * extra
  out_specs = [_seq_spec(plan, bq, True), _row_spec(bq, True)] + [_row_spec(bq, True)] * extra
  outs = _pallas(functools.partial(_dq_kernel, st=st, has_mask=km is not None, clip=clip,
                                   sink=has_sink),
                 st, (B, H, pl.cdiv(Tk, bq)), in_specs, out_specs, out_shape,
                 "two_pass_attention_bwd_dq", args, clip)(*args)
  dq, delta = outs[0], outs[1]
  dgamma = _rows_out(outs[2], st.T, plan) if clip else None
  dsink = _rows_out(outs[2], st.T, plan) if has_sink else None

  args, in_specs = _common_inputs(st, q, k, v, km, (gamma, sink), q_blocked=False)
  args += [lse_k, do_k, delta]
  in_specs += [_row_spec(Tb, False), _seq_spec(plan, Tb, False), _row_spec(Tb, False)]
  dk, dv = _pallas(functools.partial(_dkdv_kernel, st=st, has_mask=km is not None, clip=clip,
                                     sink=has_sink),
                   st, (B, H, pl.cdiv(Sk, bk)), in_specs,
                   [_seq_spec(plan, bk, True)] * 2,
                   [_seq_shape(st, B, H, Sk, k.dtype), _seq_shape(st, B, H, Sk, v.dtype)],
                   "two_pass_attention_bwd_dkdv", args)(*args)
  return (_seq_out(dq, st.T, plan), _seq_out(dk, st.S, plan), _seq_out(dv, st.S, plan), dgamma,
          dsink)


def _sp_forward(st: _Static, q, k, v, km, rs, n):
  """(out, den = sum S + eps, lse of the pass-2 softmax; the last two B x H x T x 1)."""
  plan = st.plan
  B, _, H, _ = q.shape
  bq = plan.block_q
  Tk = st.T if plan.masked else _padded_len(st.T, bq)
  args, in_specs = _common_inputs(st, q, k, v, km, (rs, n), q_blocked=True)
  row = jax.ShapeDtypeStruct((B, H, Tk, 1), jnp.float32)
  out, den, lse = _pallas(
      functools.partial(_sp_forward_kernel, st=st, has_mask=km is not None), st,
      (B, H, pl.cdiv(Tk, bq)), in_specs,
      [_seq_spec(plan, bq, True), _row_spec(bq, True), _row_spec(bq, True)],
      [_seq_shape(st, B, H, Tk, q.dtype), row, row], "softplus_attention_fwd", args)(*args)
  return _seq_out(out, st.T, plan), _rows_out(den, st.T, plan), _rows_out(lse, st.T, plan)


def _sp_backward(st: _Static, q, k, v, km, rs, n, out, den, lse, do):
  plan = st.plan
  B, _, H, _ = q.shape
  bq, bk = plan.block_q, plan.block_k
  Tk = st.T if plan.masked else _padded_len(st.T, bq)
  Sk = st.S if plan.masked else _padded_len(st.S, bk)
  Tb = _padded_len(st.T, bq)
  row = jax.ShapeDtypeStruct((B, H, Tk, 1), jnp.float32)
  args, in_specs = _common_inputs(st, q, k, v, km, (rs, n, den, lse), q_blocked=True)
  args += [_seq_in(do, plan, bq), _seq_in(out, plan, bq)]
  in_specs += [_seq_spec(plan, bq, True)] * 2
  dq, D, E = _pallas(
      functools.partial(_sp_dq_kernel, st=st, has_mask=km is not None), st,
      (B, H, pl.cdiv(Tk, bq)), in_specs,
      [_seq_spec(plan, bq, True), _row_spec(bq, True), _row_spec(bq, True)],
      [_seq_shape(st, B, H, Tk, q.dtype), row, row], "softplus_attention_bwd_dq", args)(*args)
  args, in_specs = _common_inputs(st, q, k, v, km, (rs, n, den, lse), q_blocked=False)
  args += [_seq_in(do, plan, bq), D, E]
  in_specs += [_seq_spec(plan, Tb, False), _row_spec(Tb, False), _row_spec(Tb, False)]
  dk, dv = _pallas(
      functools.partial(_sp_dkdv_kernel, st=st, has_mask=km is not None), st,
      (B, H, pl.cdiv(Sk, bk)), in_specs, [_seq_spec(plan, bk, True)] * 2,
      [_seq_shape(st, B, H, Sk, k.dtype), _seq_shape(st, B, H, Sk, v.dtype)],
      "softplus_attention_bwd_dkdv", args)(*args)
  return _seq_out(dq, st.T, plan), _seq_out(dk, st.S, plan), _seq_out(dv, st.S, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _softplus_attention(q, k, v, km, rs, n, st: _Static):
  return _sp_forward(st, q, k, v, km, rs, n)[0]


def _softplus_attention_fwd(q, k, v, km, rs, n, st: _Static):
  out, den, lse = _sp_forward(st, q, k, v, km, rs, n)
  return out, (q, k, v, km, rs, n, out, den, lse)


def _softplus_attention_bwd(st: _Static, res, do):
  q, k, v, km, rs, n, out, den, lse = res
  dq, dk, dv = _sp_backward(st, q, k, v, km, rs, n, out, den, lse, do)
  # the row scale and the key counts come from the mask alone: no gradient
  return dq, dk, dv, None, jnp.zeros_like(rs), jnp.zeros_like(n)


_softplus_attention.defvjp(_softplus_attention_fwd, _softplus_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, km, gamma, sink, st: _Static):
  return _forward(st, q, k, v, km, gamma, sink)[0]


def _attention_fwd(q, k, v, km, gamma, sink, st: _Static):
  out, lse = _forward(st, q, k, v, km, gamma, sink)
  return out, (q, k, v, km, gamma, sink, out, lse)


def _attention_bwd(st: _Static, res, do):
  q, k, v, km, gamma, sink, out, lse = res
  dq, dk, dv, dgamma, dsink = _backward(st, q, k, v, km, gamma, out, lse, do, sink)
  return dq, dk, dv, None, dgamma, dsink


_attention.defvjp(_attention_fwd, _attention_bwd)


def two_pass_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array, *,
                       causal: bool = False, key_mask_BxS: Optional[Array] = None, gamma=None,
                       zeta: float = 1.0, sink=None, softplus_p: Optional[float] = None,
                       softplus_eps: float = 1e-6, scale=None,
                       interpret: Optional[bool] = None, block_q: Optional[int] = None,
                       block_k: Optional[int] = None) -> Array:
  """Fused multi-head attention with softmax, or clipped softmax when gamma is given.

  Args:
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK: queries, keys, values (same float dtype; float32 math with
      the P.V and gradient products in the input dtype).
    causal: query i sees keys j <= i.
    key_mask_BxS: True = valid key (padding mask), or None.
    gamma: None (softmax) or gamma <= 0 for clip((zeta - gamma) * P + gamma, 0, 1): a Python
      float, a traced scalar, or an array broadcastable to B x H x T x 1 (one value per query
      row and head). Differentiable.
    zeta: Python float >= 1.
    sink: None, or the sink logit b of softmax with a sink, p_ij = exp(s_ij) / (exp(b) +
      sum_k exp(s_ik)) (qtx.nn.normalizers.softmax_with_sink): a scalar, or an array
      broadcastable to B x H x T x 1, e.g. (H, 1, 1) per head; -inf is plain softmax. Its
      gradient comes from the backward kernel (d b_i = -p_sink,i dO_i . O_i). Not with gamma.
    softplus_p, softplus_eps: None, or softplus attention with re-weighting (Gao & Spratling
      2025; qtx.nn.normalizers.softplus_reweight with p, eps) in place of the softmax, on q and
      k the caller has L2-normalised. Not with gamma or sink.
    scale: score multiplier, default 1 / sqrt(K); with softplus_p a per-row scale broadcastable
      to B x H x T x 1 is allowed, default log(K) log(max(N_i, 2)) with N_i the keys row i
      sees.
    interpret: None = interpret on CPU, compile on GPU/TPU.
    block_q, block_k: block sizes (powers of two >= 16); chosen per backend when None.

  Returns:
    B x T x H x K in the dtype of q. Fully masked rows are zeros.
  """
  q, k, v = (jnp.asarray(a) for a in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
  for name, a in (("q", q), ("k", k), ("v", v)):
    _sm._check_float(a, name)
    if a.ndim != 4:
      raise ValueError(f"{name} must be B x T x H x K (4 axes), got shape {a.shape}")
  B, T, H, K = q.shape
  S = k.shape[1]
  if k.shape != (B, S, H, K) or v.shape != k.shape:
    raise ValueError(f"k and v must be B x S x H x K = ({B}, S, {H}, {K}) alike, got k "
                     f"{k.shape} and v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if gamma is not None:
    _sm.check_clip_params(gamma, zeta)
  if sum(x is not None for x in (gamma, sink, softplus_p)) > 1:
    raise ValueError("two_pass_attention takes one of gamma (clipped softmax), sink (softmax "
                     "with a sink) and softplus_p (softplus attention), not several")
  plan = make_plan(T, S, K, interpret, platform=target_lib.platform(q, k, v), block_q=block_q,
                   block_k=block_k)
  km = None
  if key_mask_BxS is not None:
    key_mask_BxS = jnp.asarray(key_mask_BxS).astype(bool)
    if key_mask_BxS.shape != (B, S):
      raise ValueError(f"key_mask_BxS must have shape ({B}, {S}), got {key_mask_BxS.shape}")
    km = key_mask_BxS.astype(jnp.int32)[:, None, :]
  rows = lambda x, name, hint="": _row_array(x, name, (B, H, T, 1), hint)
  dims = [(0, 2), (0, 2), (0, 2), (0, None), (0, 1), (0, 1)]  # q, k, v, mask, 2 row arrays
  if softplus_p is not None:
    p, eps = float(softplus_p), float(softplus_eps)
    if not p > 0:
      raise ValueError(f"softplus_p must be > 0, got {p}")
    if not eps > 0:
      raise ValueError(f"softplus_eps must be > 0, got {eps}")
    n = jnp.full((1, 1, T, 1), float(S), jnp.float32)  # keys each row sees
    if causal:
      n = jnp.minimum(n, (jnp.arange(T, dtype=jnp.float32) + 1.0 + (S - T))[None, None, :, None])
    if km is not None:
      n = jnp.minimum(n, jnp.sum(key_mask_BxS, -1, dtype=jnp.float32)[:, None, None, None])
    n = jnp.broadcast_to(n, (B, H, T, 1))
    rs = rows(math.log(K) * jnp.log(jnp.maximum(n, 2.0)) if scale is None else scale, "scale")
    st = _Static(plan, T, S, K, bool(causal), 1.0, 1.0, softplus_p=p, softplus_eps=eps)
    fn, extra = _softplus_attention, [rs, n]
  else:
    g = None if gamma is None else rows(gamma, "gamma")
    b = None if sink is None else rows(sink, "sink", "; per head it is (H, 1, 1)")
    scale = 1.0 / math.sqrt(K) if scale is None else float(scale)
    st = _Static(plan, T, S, K, bool(causal), scale, float(zeta))
    fn, extra = _attention, [g, b]
  # per device under a mesh: batch over the data axes, heads over the tensor axis
  return sharding.sharded_call(lambda *a: fn(*a, st), [q, k, v, km] + extra, dims=dims,
                               out_dims=(0, 2), out_ndim=4, batch=B, heads=H)


def _row_array(x, name: str, shape, hint: str = ""):
  """x (a scalar or an array broadcastable to B x H x T x 1) as float32 of that shape."""
  x = jnp.asarray(x, jnp.float32)
  try:
    return jnp.broadcast_to(x, shape)
  except ValueError:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to B x H x T x 1 = "
                     f"{tuple(shape)}{hint}") from None
