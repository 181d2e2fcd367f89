"""benchmarks/: the parts that compute (the timings themselves are not tests)."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import train_step as bench


def test_op_time_by_kind_groups_fusions_and_skips_executor_spans():
  events = [
      {"ph": "X", "name": "ynn_fusion.3", "dur": 4000},
      {"ph": "X", "name": "ynn_fusion.12", "dur": 2000},
      {"ph": "X", "name": "dot", "dur": 1000},
      {"ph": "X", "name": "add_select_fusion.1", "dur": 500},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
      {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
      {"ph": "i", "name": "dot", "dur": 7000},  # not a complete event
      {"ph": "X", "name": "copy.2"},  # no duration
  ]
  got = bench.op_time_by_kind(events, steps=2)
  assert got == pytest.approx({"ynn_fusion": 3.0, "dot": 0.5, "add_select_fusion": 0.25})


def test_op_time_by_part_labels_towers_parts_and_directions():
  names = {
      "ynn_fusion.1": "jit(step_fn)/jvp(CLIP)/CLIP.encode_image/visual/encoder/block_0/attn/dot",
      "ynn_fusion.2": "jit(step_fn)/transpose(jvp(CLIP))/CLIP.encode_image/visual/encoder/"
                      "block_2/mlp/fc1/dot_general",
      "copy.3": "jit(step_fn)/transpose(jvp(CLIP))/CLIP.encode_text/textual/encoder/block_1/"
                "ln_2/add_any",
      "fusion.4": "jit(step_fn)/jvp(CLIP)/CLIP.encode_text/textual/token_embed/take",
      "fusion.5": "jit(step_fn)/add",
  }
  names["wrapped_reduce-window.6"] = ""  # an instruction without a name scope
  events = [{"ph": "X", "name": n, "dur": 1000 * (i + 1)} for i, n in enumerate(names)]
  events += [{"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
             {"ph": "X", "name": "PjitFunction(jit(step_fn))", "dur": 9000}]
  got = bench.op_time_by_part(events, steps=1, op_names=names)
  assert got == pytest.approx({"image attention fwd": 1.0, "image MLP bwd": 2.0,
                               "text LayerNorm bwd": 3.0, "text embedding, pooling, other fwd": 4.0,
                               "loss, optimizer, other": 5.0,
                               "XLA-created ops (no name scope)": 6.0})


def test_hlo_op_names_keeps_instructions_without_a_name_scope():
  hlo = (
      "%fused_computation.3 (param_0: f32[4]) -> f32[4] {\n"
      "  %param_0 = f32[4]{0} parameter(0)\n"
      '  ROOT %tanh.1 = f32[4]{0} tanh(%param_0), metadata={op_name="jit(f)/tanh" '
      'stack_frame_id=1}\n'
      "}\n"
      "ENTRY %main.9 (a.1: f32[4]) -> f32[4] {\n"
      "  %wrapped_reduce-window.6 = f32[4]{0} fusion(%a.1), kind=kLoop\n"
      '  ROOT %ynn_fusion.2 = f32[4]{0} fusion(%a.1), kind=kCustom, '
      'metadata={op_name="jit(f)/CLIP.encode_image/attn/dot_general"}\n'
      "}\n")
  assert bench.hlo_op_names(hlo) == {
      "param_0": "", "tanh.1": "jit(f)/tanh", "wrapped_reduce-window.6": "",
      "ynn_fusion.2": "jit(f)/CLIP.encode_image/attn/dot_general"}


def test_hlo_op_names_reads_a_compiled_module():
  f = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
  compiled = f.lower(jnp.ones((8, 8))).compile()
  names = bench.hlo_op_names(compiled.as_text())
  assert "jit(<lambda>)/tanh" in names.values()
  assert "jit(<lambda>)/dot_general" in names.values()


def test_profile_by_part_of_a_real_two_tower_gradient():
  """Trace a compiled gradient of a module with encode_image / encode_text methods (the CLIP
  model's scopes): the trace's ops must be found in the compiled module by name and land in
  both towers' parts, forward and backward (real flax and autodiff name scopes, not a
  hand-written table)."""
  import flax.linen as nn

  class Towers(nn.Module):
    def setup(self):
      self.visual = nn.Dense(32, name="visual")
      self.textual = nn.Dense(32, name="textual")

    def encode_image(self, x):
      with jax.named_scope("mlp"):
        return jnp.tanh(self.visual(x))

    def encode_text(self, x):
      with jax.named_scope("attn"):
        return jax.nn.softmax(self.textual(x))

    def __call__(self, a, b):
      return jnp.sum(self.encode_image(a) * self.encode_text(b))

  m = Towers(name="CLIP")
  x = jnp.ones((64, 16))
  params = m.init(jax.random.key(0), x, x)
  step = jax.jit(lambda p, a: (p, jax.grad(lambda p: m.apply(p, a, a))(p)))
  compiled = step.lower(params, x).compile()
  names = bench.hlo_op_names(compiled.as_text())
  by_part = bench.profile_ops(compiled, params, x, steps=3, op_names=names)
  labels = set(by_part)
  assert any(l.startswith("image MLP fwd") for l in labels), labels
  assert any(l.startswith("image MLP bwd") for l in labels), labels
  assert any(l.startswith("text attention") for l in labels), labels
  assert all(v > 0 for v in by_part.values())


def test_profile_ops_reads_a_real_trace():
  f = jax.jit(lambda s, b: (s + 1, jnp.tanh(b @ b.T).sum()))
  ops = bench.profile_ops(f, jnp.zeros(()), jnp.ones((64, 64)), steps=3)
  assert ops and all(v >= 0 for v in ops.values()) and sum(ops.values()) > 0


def test_normalizer_grad_swaps_in_the_plain_formula_and_restores():
  """The benchmark's B side must really be autodiff of the same forward (its jaxpr has no
  custom_vjp), and the shipped VJP must be back afterwards."""
  import numpy as np
  from benchmarks import normalizer_grad
  from qtx.nn import normalizers as N
  x = jax.random.normal(jax.random.key(0), (2, 5, 5))
  f = lambda x: N.softplus_reweight(x, p=1.0)
  assert "custom_vjp" in str(jax.make_jaxpr(f)(x))
  with normalizer_grad.plain_gradients():
    jaxpr = str(jax.make_jaxpr(lambda x: f(x))(x))  # a new function: no cached trace
    y_plain = f(x)
  assert "custom_vjp" not in jaxpr
  assert "custom_vjp" in str(jax.make_jaxpr(lambda x: f(x))(x))  # the written-out VJP is back
  np.testing.assert_allclose(y_plain, f(x), rtol=1e-6, atol=1e-7)


def test_input_pipeline_benchmark_qtx_side_runs():
  from benchmarks import input_pipeline
  rows = input_pipeline.main(["--images", "8", "--size", "64", "--crop", "32", "--rounds", "1",
                              "--qtx-only"])
  assert len(rows["qtx"]) == 1 and rows["qtx"][0] > 0 and rows["open_clip"] == []


def test_vs_open_clip_alternates_the_sides():
  """The comparison alternates (A B, B A, ...) after warming both."""
  from benchmarks import vs_open_clip
  calls = []
  res = vs_open_clip.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               batch=4, steps=2, rounds=3, warmup=1)
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
  assert {k: len(v) for k, v in res.items()} == {"a": 3, "b": 3}


def test_vs_commit_exports_a_commit_as_a_second_package(tmp_path):
  """The base commit is importable next to qtx, with no reference left to the working tree's
  package, and its config files build its own config."""
  import importlib
  import pathlib
  import subprocess
  import sys
  from benchmarks import vs_commit
  repo = pathlib.Path(__file__).resolve().parents[1]
  if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode:
    pytest.skip("not a git checkout")
  root = vs_commit.export_commit("HEAD", str(tmp_path), repo=str(repo))
  pkg = tmp_path / vs_commit.BASE_PACKAGE
  import re
  for path in list(pkg.rglob("*.py")) + list((tmp_path / "configs").rglob("*.py")):
    for line in path.read_text().splitlines():
      assert not re.match(r"\s*(import|from) qtx[. ]", line), (path, line)
  sys.path.insert(0, root)
  try:
    config_lib = importlib.import_module("qtx_base.config_lib")
    c = config_lib.load_config_file(str(tmp_path / "configs" / "clip_tiny.py"))
    assert c.model.image.width == 64 and config_lib.__file__.startswith(str(pkg))
    assert importlib.import_module("qtx_base.data.registry").names()  # sources found
  finally:
    sys.path.remove(root)
    for name in [m for m in sys.modules if m.split(".")[0] == "qtx_base"]:
      del sys.modules[name]
  calls = []
  res = vs_commit.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            steps=1, rounds=2, warmup=1)
  assert calls == ["a", "b", "a", "b", "b", "a"] and len(res["a"]) == 2


def test_remedy_step_time_rows_are_sweep_rows_and_ratios_are_per_round():
  from benchmarks import remedy_step_time as rst
  from benchmarks.train_step import load_config
  c = rst.row_config(load_config("configs/clip_tiny.py"), "clipped_softmax@alpha=1")
  for tower in (c.model.image, c.model.text):
    assert tower.attention.normalizer == "clipped_softmax"
    assert tower.attention.alpha == 1.0
  assert c.mesh.num_devices == 1
  ms = {"softmax": [10.0, 20.0], "b": [15.0, 20.0]}
  assert rst.ratios(ms, "softmax") == {"softmax": [1.0, 1.0], "b": [1.5, 1.0]}
  text = rst.markdown(ms, "softmax", "hdr")
  assert "| b | 17.5 (15.0-20.0) | 1.250 (1.00-1.50) |" in text
