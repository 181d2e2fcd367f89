"""The Pallas kernels under a mesh of 8 simulated CPU devices (interpret mode): values and
gradients equal the 1-device result, and each device's pallas_call sees 1/8 of the work (its
operands' shapes in the traced program)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtx import kernels, parallel
from qtx.kernels import sharding

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _mesh(shape=MESH):
  return parallel.make_mesh(shape, jax.devices()[:8])


def _pallas_shapes(fn, *args):
  """Operand shapes of every pallas_call in fn's jaxpr (inside shard_map bodies too)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "jaxpr"):
            visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _qkv(B=8, T=19, H=4, K=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (B, T, H, K)) for k in ks]


@pytest.mark.parametrize("gamma", [None, "per_row"], ids=["softmax", "clipped_per_row"])
def test_attention_on_a_mesh_equals_one_device(gamma):
  q, k, v = _qkv()
  B, T, H, _ = q.shape
  km = jnp.arange(T)[None, :] < jnp.array([19, 12, 5, 19, 7, 19, 1, 16])[:, None]
  g = None if gamma is None else -0.5 / (1.0 + jnp.arange(T, dtype=jnp.float32))[None, None, :, None]
  w = jax.random.normal(jax.random.key(9), q.shape)

  def loss(q, k, v, g):
    out = kernels.two_pass_attention(q, k, v, causal=True, key_mask_BxS=km, gamma=g)
    return jnp.sum(out * w), out

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) + ((3,) if g is not None else ()),
                                 has_aux=True))
  (l1, o1), g1 = f(q, k, v, g)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    (l8, o8), g8 = f(q, k, v, g)
    shapes = _pallas_shapes(lambda *a: f(*a), q, k, v, g)
  np.testing.assert_allclose(o8, o1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # forward, dq and dk/dv kernels: each sees B / 4 sequences and H / 2 heads of q
  assert len(shapes) == 3, shapes
  for s in shapes:
    assert s[0] == (B // 4, T, H // 2, 8), s
  # without a mesh the kernels see everything
  assert {s[0] for s in _pallas_shapes(lambda *a: f(*a), q, k, v, g)} == {(B, T, H, 8)}


def test_softmax_and_logsumexp_on_a_mesh_equal_one_device():
  x = jax.random.normal(jax.random.key(1), (8, 4, 9, 13)) * 3
  where = jnp.arange(13)[None, None, None, :] <= jnp.arange(9)[None, None, :, None] + 4
  gamma = -0.02 * jnp.arange(1, 5, dtype=jnp.float32)[None, :, None, None]
  w = jax.random.normal(jax.random.key(2), x.shape)
  f = jax.jit(jax.value_and_grad(
      lambda x, g: jnp.sum(kernels.two_pass_softmax(x, where=where, gamma=g) * w), (0, 1)))
  lse = jax.jit(jax.value_and_grad(lambda y: jnp.sum(kernels.logsumexp(y) * jnp.arange(8.0))))
  y = jax.random.normal(jax.random.key(3), (8, 8)) * 4
  v1, g1 = f(x, gamma)
  s1, d1 = lse(y)
  with jax.set_mesh(_mesh()):
    v8, g8 = f(x, gamma)
    s8, d8 = lse(y)
    shapes = _pallas_shapes(f, x, gamma)
    lse_shapes = _pallas_shapes(lse, y)
  np.testing.assert_allclose(v8, v1, rtol=1e-5)
  for a, b in zip(g8, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s8, s1, rtol=1e-5)
  np.testing.assert_allclose(d8, d1, rtol=1e-5, atol=1e-6)
  # rows per device: (8 / 4) * (4 / 2) * 9 of the 8 * 4 * 9 rows
  assert shapes and all(s[0] == (2 * 2 * 9, 13) for s in shapes), shapes
  assert lse_shapes and all(s[0] == (2, 8) for s in lse_shapes), lse_shapes


def test_split_axes_follow_the_mesh_and_divisibility():
  mesh = _mesh()
  with jax.set_mesh(mesh):
    assert sharding.split_axes(8, 4) == (("data", "fsdp"), ("tensor",))
    assert sharding.split_axes(6, 3) == (("data",), ())  # 6 = 2 x 3: fsdp would not divide
    assert sharding.split_axes(3, None) == ((), ())
  assert sharding.split_axes(8, 4) == ((), ())  # no mesh in context
  with jax.set_mesh(_mesh({"data": 8, "fsdp": 1, "tensor": 1})):
    assert sharding.split_axes(16, 4) == (("data",), ())


def test_odd_batch_runs_replicated_and_equal():
  """A batch the mesh cannot split (3 sequences) still runs, on whole arrays."""
  q, k, v = _qkv(B=3, T=7, H=2, K=4)
  f = jax.jit(lambda q, k, v: kernels.two_pass_attention(q, k, v))
  want = f(q, k, v)
  with jax.set_mesh(_mesh()):
    got = f(q, k, v)
    shapes = _pallas_shapes(f, q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert shapes[0][0] == (3, 7, 1, 4)  # heads still split over the tensor axis


def test_clip_train_step_with_pallas_runs_per_device():
  """attention.impl=pallas in the CLIP model on a 2 x 2 x 2 mesh: the train step's losses equal
  one device's, and the traced step's attention kernels see B / 4 sequences and H / 2 heads."""
  from conftest import micro_config
  from qtx import run as run_lib
  from qtx.modes import train as train_mode
  losses, kernel_shapes = {}, None
  rng = np.random.default_rng(0)
  for key, shape, n in (("1", {"data": 1, "fsdp": 1, "tensor": 1}, 1), ("8", MESH, 0)):
    c = micro_config("clipped_softmax", **{"train.batch_size": 8})
    for t in (c.model.image, c.model.text):
      t.depth, t.attention.impl = 1, "pallas"
    c.mesh.shape, c.mesh.num_devices = shape, n
    s = run_lib.build(c, train=True)
    state = run_lib.init_state(s, 0)
    step = train_mode.make_train_step(s)
    out = []
    for i in range(2):
      r = np.random.default_rng(i)
      tokens = r.integers(1, 1000, (8, c.model.text.context_length)).astype(np.int32)
      tokens[:, 5] = 49407
      batch = {"image": r.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "tokens": tokens}
      state, m = step(state, parallel.global_batch(batch, s.mesh, s.rules))
      out.append(float(m["train/loss"]))
    losses[key] = out
    if key == "8":
      with jax.set_mesh(s.mesh):
        kernel_shapes = _pallas_shapes(
            lambda p, b: jax.grad(lambda q: train_mode.loss_fn(s.model, c, q, b, 0)[0])(p),
            state.params, parallel.global_batch(batch, s.mesh, s.rules))
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5)
  # the image tower's attention (16 patches + class token, 2 heads of width 16): forward, dq
  # and dk/dv kernels, each on 8 / 4 sequences and 2 / 2 heads
  assert [s[0] for s in kernel_shapes] == [(2, 17, 1, 16)] * 3, kernel_shapes
