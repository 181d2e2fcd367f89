"""Sharding: mesh construction, logical rules, and equivalence of sharded and 1-device steps."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from qtx import config_lib, parallel
from qtx import run as run_lib
from qtx.modes import train as train_mode


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  s = c.model.image.image_size
  B, T = c.train.batch_size, c.model.text.context_length
  tokens = rng.integers(1, 1000, (B, T)).astype(np.int32)
  tokens[:, 5] = 49407
  return {"image": rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8), "tokens": tokens}


@pytest.mark.parametrize("shape,expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ((1, -1, 1), (1, 8, 1)),
    ({"fsdp": 4, "data": 2}, (2, 4, 1)),
])
def test_mesh_shape_resolution(shape, expected):
  assert parallel.mesh_shape(shape, 8) == expected


@pytest.mark.parametrize("shape,msg", [
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 2, "model": 4}, "unknown mesh axes"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "has 4 devices, but 8"),
    ((2, 4), "must have 3 entries"),
])
def test_mesh_shape_errors(shape, msg):
  with pytest.raises(ValueError, match=msg):
    parallel.mesh_shape(shape, 8)


def _loss_and_grads(c, batch):
  s = run_lib.build(c, train=True)
  state = run_lib.init_state(s, 0)

  def f(params, b):
    return jax.value_and_grad(lambda p: train_mode.loss_fn(s.model, c, p, b, 0)[0])(params)

  bsh = parallel.batch_sharding(s.mesh, s.rules)
  gb = parallel.global_batch(batch, s.mesh, s.rules)
  loss, grads = jax.jit(f, in_shardings=(s.state_sharding.params, bsh),
                        out_shardings=(parallel.replicated(s.mesh),
                                       s.state_sharding.params))(state.params, gb)
  return float(loss), jax.device_get(grads), s, state


@pytest.mark.parametrize("preset,shape,rules", [
    ("gated", {"data": 2, "fsdp": 2, "tensor": 2}, "default"),
    ("clipped_softmax", {"data": 8, "fsdp": 1, "tensor": 1}, "replicated"),
    ("softplus", {"data": 1, "fsdp": 8, "tensor": 1}, "default"),
])
def test_sharded_loss_and_grads_equal_single_device(preset, shape, rules):
  c1 = micro_config(preset)
  batch = _batch(c1)
  loss1, g1, _, _ = _loss_and_grads(c1, batch)
  c8 = micro_config(preset)
  c8.mesh.shape = shape
  c8.mesh.num_devices = 0
  c8.mesh.rules = rules
  loss8, g8, s8, state8 = _loss_and_grads(c8, batch)
  # float32; only the order of reductions differs between the meshes
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # round-off of a reordered float32 sum scales with the leaf's largest entries, not each one's
  flat1 = jax.tree_util.tree_flatten_with_path(g1)[0]
  for (path, a), (path1, b) in zip(jax.tree_util.tree_flatten_with_path(g8)[0], flat1):
    assert path == path1
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # params really are sharded as the rules say
  specs = jax.tree.map(lambda x: x.sharding.spec, state8.params)
  qk = specs["visual"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
  if rules == "replicated":
    assert all(a is None for a in qk)
  else:
    assert tuple(qk) == ("fsdp", "tensor")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_steps_equal_on_mesh_and_single_device(optimizer):
  """Muon orthogonalises matrices that FSDP and the tensor axis shard: same steps as 1 device."""
  losses = {}
  for key, shape, n in (("1", {"data": 1, "fsdp": 1, "tensor": 1}, 1),
                        ("8", {"data": 2, "fsdp": 2, "tensor": 2}, 0)):
    c = micro_config("gated")
    c.train.optimizer = optimizer
    c.mesh.shape, c.mesh.num_devices = shape, n
    s = run_lib.build(c, train=True)
    state = run_lib.init_state(s, 0)
    step = train_mode.make_train_step(s)
    out = []
    for i in range(3):
      state, m = step(state, parallel.global_batch(_batch(c, i), s.mesh, s.rules))
      out.append(float(m["train/loss"]))
    losses[key] = (out, jax.device_get(state.params))
  np.testing.assert_allclose(losses["8"][0], losses["1"][0], rtol=1e-5)
  p8, p1 = (jax.tree_util.tree_flatten_with_path(losses[k][1])[0] for k in ("8", "1"))
  for (path, a), (_, b) in zip(p8, p1):
    name = jax.tree_util.keystr(path)
    # Adam divides by sqrt(v): where a gradient entry is near 0 the two meshes' different
    # reduction orders become up to ~lr of update per step. Softmax is invariant to the key
    # bias, so its exact gradient is 0 and every entry is such noise; elsewhere only a few
    # entries may be (e.g. an embedding row whose token gets a tiny gradient) -- at most 1 in
    # 10^4 entries of a leaf may leave 1e-5, and none may leave 3 steps x lr (x 3).
    bound = 3 * 3 * c.train.lr
    if "'key']['bias'" in name:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=bound, err_msg=name)
      continue
    off = ~np.isclose(a, b, rtol=1e-4, atol=1e-5)
    assert off.sum() <= off.size // 10_000, (name, int(off.sum()), off.size)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=bound, err_msg=name)


def test_b16_muon_state_is_sharded_like_the_parameters():
  """Muon's momentum (hidden matrices) and AdamW's moments (the rest) under FSDP over 8."""
  from qtx import optim
  c = config_lib.b16_config()
  c.data.allow_synthetic = True
  c.train.optimizer = "muon"
  c.mesh.shape = {"data": 1, "fsdp": 8, "tensor": 1}
  s = run_lib.build(c, train=True)
  params = jax.tree_util.tree_flatten_with_path(s.abstract_state.params)[0]
  labels = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(
      optim.param_labels(s.abstract_state.params))[0])
  specs = {jax.tree_util.keystr(p): (x.shape, x.sharding.spec) for p, x in params}
  found = {"muon": 0, "adamw": 0}
  for path, x in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]:
    key = jax.tree_util.keystr(path)
    if ".mu" not in key and ".nu" not in key:
      continue
    name = next(n for n in specs if key.endswith(n))
    assert (x.shape, x.sharding.spec) == specs[name], key
    group = "muon" if "'muon'" in key else "adamw"
    assert labels[name] == group, key
    found[group] += 1
  n_muon = sum(v == "muon" for v in labels.values())
  assert n_muon == 6 * 24  # q, k, v, out, fc1, fc2 of the 12 + 12 blocks
  assert found == {"muon": n_muon, "adamw": 2 * (len(params) - n_muon)}, found


def test_b16_fsdp_shards_every_large_parameter_without_allocating():
  c = config_lib.b16_config()
  c.data.allow_synthetic = True  # shapes only: nothing is trained
  c.mesh.shape = {"data": 1, "fsdp": 8, "tensor": 1}
  s = run_lib.build(c, train=True)  # eval_shape only; raises if a >1 MiB param is replicated
  leaves = jax.tree_util.tree_flatten_with_path(s.abstract_state.params)[0]
  leaves_by_name = [(jax.tree_util.keystr(p), x) for p, x in leaves]
  big = [(jax.tree_util.keystr(p), x) for p, x in leaves if x.size * 4 >= 1 << 20]
  assert len(big) > 100
  for name, x in big:
    assert any(a is not None for a in x.sharding.spec), name
    shard = x.sharding.shard_shape(x.shape)
    assert np.prod(shard) * 8 == np.prod(x.shape), (name, shard)
  # Adam's moments are sharded exactly like their parameters (not replicated on every device)
  specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in leaves}
  moments = 0
  for path, x in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]:
    key = jax.tree_util.keystr(path)
    for name, spec in specs.items():
      if key.endswith(name) and (".mu" in key or ".nu" in key) and x.shape == (
          dict(leaves_by_name)[name].shape):
        assert x.sharding.spec == spec, (key, x.sharding.spec, spec)
        moments += 1
  assert moments == 2 * len(leaves)
  # eval and PTQ build no optimizer: parameters only, with the same shardings
  e = run_lib.build(c)
  assert e.tx is None and e.abstract_state is None
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding.spec, e.abstract_params),
                              jax.tree.map(lambda x: x.sharding.spec, s.abstract_state.params))
  # the train step lowers (no compile, no allocation) with these shardings
  step = train_mode.make_train_step(s)
  batch = {"image": jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.uint8,
                                         sharding=parallel.batch_sharding(s.mesh)),
           "tokens": jax.ShapeDtypeStruct((16, 77), jnp.int32,
                                          sharding=parallel.batch_sharding(s.mesh))}
  step.lower(s.abstract_state, batch)  # lowering with these shardings must succeed


def test_check_fsdp_catches_replicated_large_param():
  c = config_lib.b16_config()
  c.data.allow_synthetic = True  # shapes only: nothing is trained
  c.mesh.shape = {"data": 1, "fsdp": 8, "tensor": 1}
  c.mesh.rules = "replicated"
  with pytest.raises(ValueError, match="large parameters are replicated"):
    run_lib.build(c, train=True)


def _mesh8():
  return parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("T", [3, 40])  # 8 x 3 ids < 50 rows: gathered; 8 x 40 > 50: autodiff's
def test_embed_lookup_value_and_table_gradient_equal_take_on_a_mesh(T):
  from jax.sharding import NamedSharding, PartitionSpec as P
  from qtx.nn.text import embed_lookup
  rng = np.random.default_rng(0)
  V, D, B = 50, 4, 8
  table = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 6, (B, T)), jnp.int32)  # few distinct ids: rows repeat
  w = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)

  def loss(lookup, t, i, w):
    return jnp.sum(jnp.tanh(lookup(t, i)) * w)

  ref_v, ref_g = jax.value_and_grad(loss, argnums=1)(
      lambda t, i: jnp.take(t, i, axis=0), table, ids, w)
  mesh = _mesh8()
  rows = NamedSharding(mesh, P("data"))
  f = jax.jit(jax.value_and_grad(functools.partial(loss, embed_lookup), argnums=0),
              in_shardings=(parallel.replicated(mesh), rows, rows))
  with jax.set_mesh(mesh):
    hlo = f.lower(table, ids, w).compile().as_text()
    v, g = f(table, ids, w)
  np.testing.assert_allclose(v, ref_v, rtol=1e-6)
  np.testing.assert_allclose(g, ref_g, rtol=1e-6, atol=1e-6)  # summation order only
  assert not np.any(np.asarray(g)[6:]), "rows no id selects have a zero gradient"
  table_all_reduced = any(f"f32[{V},{D}]" in line for line in hlo.splitlines()
                          if " all-reduce(" in line)
  # Fewer ids than rows: the cotangent is gathered, the V x D table never all-reduced.
  assert table_all_reduced == (B * T >= V)


def test_diagonal_equals_jnp_diagonal_exactly():
  from qtx import losses
  x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 7)) * 1e3, jnp.float32)
  # signed zero and the smallest normal float on the diagonal; inf and nan off it do not leak
  x = x.at[2, 2].set(-0.0).at[3, 3].set(np.finfo(np.float32).tiny)
  x = x.at[0, 1].set(np.inf).at[4, 0].set(np.nan)
  np.testing.assert_array_equal(losses.diagonal(x), jnp.diagonal(x))


def test_data_parallel_train_step_gathers_no_indices_and_all_reduces_no_token_table():
  """Under data parallelism the step communicates features, loss row statistics and gradients
  only: the text pooling and the loss's diagonal stay batch-local (no index all-gathers), and
  with fewer tokens per batch than vocabulary rows the token table's gradient is not
  all-reduced (qtx.nn.text.embed_lookup)."""
  c = micro_config("softmax")
  c.mesh.shape, c.mesh.num_devices = {"data": 8, "fsdp": 1, "tensor": 1}, 0
  s = run_lib.build(c, train=True)
  state = run_lib.init_state(s, 0)
  step = train_mode.make_train_step(s)
  hlo = step.lower(state, parallel.global_batch(_batch(c), s.mesh, s.rules)).compile().as_text()
  lines = hlo.splitlines()
  B, T = c.train.batch_size, c.model.text.context_length
  gathers = [ln for ln in lines if " all-gather(" in ln]
  # the only integers gathered are the token ids, for the table gradient's scatter
  assert gathers and [ln for ln in gathers if "= s32[" in ln and f"= s32[{B},{T}]" not in ln
                      ] == [], gathers
  assert [ln for ln in gathers if f"= s32[{B},{T}]" in ln]
  V, D = c.model.text.vocab_size, c.model.text.width
  assert not [ln for ln in lines if " all-reduce(" in ln and f"f32[{V},{D}]" in ln]


def test_fsdp_step_runs_each_tower_on_its_batch_shard_only():
  """Under FSDP the token table is split along its width over the axis the batch is split
  over; the text tower must still run on each device's batch shard, not on the global batch
  (it did: 8x the text tower's work and HBM traffic on 8 devices; qtx.nn.text.whole_table)."""
  import re
  from qtx.aot import hlo, programs
  c = micro_config()
  c.mesh.num_devices = 0
  c.mesh.shape = {"data": 1, "fsdp": 8, "tensor": 1}
  c.train.batch_size = 64
  prog = programs.train(c, run_lib.build(c, train=True))
  module = hlo.parse(prog.fn.lower(*prog.args).compile().as_text())
  scopes = hlo.scope_of(module)
  lead = {"image": set(), "text": set()}
  for ins, _, _ in module.instructions():
    scope = scopes.get(ins.name, "")
    tower = "text" if "encode_text" in scope else "image" if "encode_image" in scope else None
    m = re.search(r"\[(\d+),(\d+),(\d+)\]", ins.shape)  # B x T x D activations
    # (the token table's gradient gathers the cotangent on purpose: embed_lookup)
    if tower and m and int(m.group(3)) == 32 and not ins.opcode.startswith("all-gather"):
      lead[tower].add(int(m.group(1)))
  assert 8 in lead["text"] and 8 in lead["image"]  # 64 rows over 8 devices
  assert 64 not in lead["text"] and 64 not in lead["image"]
