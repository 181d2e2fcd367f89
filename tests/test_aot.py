"""Compiling for accelerators this host lacks: TPU topologies (libtpu, compile-only devices),
compile mode's records against the compiled objects, the kernels' cost estimates against their
analytic counts and the compiler's cost analysis, kernels under a plain jit with sharded inputs,
and the CUDA lowering through Pallas Triton (jax.export)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

libtpu = pytest.importorskip("libtpu", reason="compiling for TPUs needs libtpu: "
                             "pip install 'jax[tpu]'")

from qtx import chips, kernels, tpu_host  # noqa: E402
from qtx.aot import fit, hlo, programs, report, topology  # noqa: E402
from qtx.kernels import attention as attn_lib  # noqa: E402


@pytest.fixture(scope="module")
def v5e_2x2():
  return topology.devices(topology.parse("v5e:2x2"))


# ----------------------------------------------------------------------------- topologies

@pytest.mark.parametrize("name,chip,shape,hosts,chips_", [
    ("v5e:2x2", "v5e", (2, 2), 1, 4), ("v5e-8", "v5e", (2, 4), 1, 8),
    ("v5e:2x4", "v5e", (2, 4), 1, 8), ("v5e:4x4", "v5e", (4, 4), 4, 16),
    ("v5e-256", "v5e", (16, 16), 64, 256), ("v5e-1", "v5e", (1, 1), 1, 1),
    ("v6e:1x1", "v6e", (1, 1), 1, 1), ("v6e-8", "v6e", (2, 4), 1, 8),
    ("v4-8", "v4", (2, 2, 1), 1, 4), ("v5p-16", "v5p", (2, 2, 2), 2, 8)])
def test_topology_names(name, chip, shape, hosts, chips_):
  t = topology.parse(name)
  assert (t.chip, t.shape, t.hosts, t.chips) == (chip, shape, hosts, chips_)


@pytest.mark.parametrize("bad", ["v5e", "v5e:2x2x2", "v9:2x2", "v5e-3", "v4-7", "tpu"])
def test_topology_names_refused(bad):
  with pytest.raises(ValueError, match="compile.topology"):
    topology.parse(bad)


def test_gpu_topology_names():
  t = topology.parse("h100-16")
  assert (t.platform, t.shape, t.hosts, t.chips, t.name) == ("gpu", (2, 8), 2, 16, "h100:2x8")
  assert topology.parse("h100-4").shape == (1, 4) and topology.parse("h100:1x8").chips == 8
  with pytest.raises(ValueError, match="do not fill hosts"):
    topology.parse("h100-12")


def test_no_accelerator_means_the_cpu_platform():
  if tpu_host.accelerator_devices():
    pytest.skip("this host has an accelerator")
  env = {}
  assert tpu_host.cpu_platform_default(env) and env["JAX_PLATFORMS"] == "cpu"
  mine = {"JAX_PLATFORMS": "cuda"}
  assert not tpu_host.cpu_platform_default(mine) and mine["JAX_PLATFORMS"] == "cuda"


def test_compile_for_h100_without_a_gpu(micro, tmp_path):
  pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the CUDA plugin: pip install "
                      "-e '.[gpu-compile]'")
  from qtx import modes
  c = _config(micro)
  c.compile.topology = "h100-8"
  c.compile.what = "train,encode_image"
  modes.run(c, str(tmp_path))
  recs = json.loads((tmp_path / "compile.json").read_text())["programs"]
  assert [(r["program"], r["chips"], r["device_kind"]) for r in recs] == \
      [("train", 8, "NVIDIA H100 80GB HBM3"), ("encode_image", 8, "NVIDIA H100 80GB HBM3")]
  assert all(r["fits"] and r["used_bytes"] > 0 for r in recs)
  assert recs[0]["hbm_bytes"] == 80 * 2**30 and recs[0]["collective_bytes"]["all-reduce"] > 0
  assert recs[0]["roofline_s"] is None and recs[0]["cost_incomplete"]  # no cost analysis


def test_compile_only_devices_match_the_topology():
  for name, kind, n, procs in (("v5e:4x4", "TPU v5 lite", 16, 4), ("v6e-8", "TPU v6 lite", 8, 1),
                               ("v4-16", "TPU v4", 8, 2)):
    devs = topology.devices(topology.parse(name))
    assert len(devs) == n and devs[0].device_kind == kind
    assert len({d.process_index for d in devs}) == procs
    assert chips.of_device(devs[0]).name == name.split(":")[0].split("-")[0]
  devs = topology.devices(topology.parse("v5e:2x2", num_slices=2))
  assert len(devs) == 8 and len({d.slice_index for d in devs}) == 2


def test_quiet_compile_only_environment():
  env = {}
  if tpu_host.tpu_chips():
    pytest.skip("this host has TPU chips")
  assert tpu_host.quiet_compile_only(env)
  assert env["TPU_WORKER_HOSTNAMES"] == "localhost" and env["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
  assert tpu_host.placeholder_env(env)
  user = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}  # a pod's own: left alone
  assert not tpu_host.quiet_compile_only(user) and not tpu_host.placeholder_env(user)


# ----------------------------------------------------------------------------- HLO reading

HLO = """HloModule m, entry_computation_layout={()->f32[8,16]{1,0}}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,16]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(f)/CLIP.encode_image/visual/encoder/block_0/attn/dot_general"}
  %y = f32[8,16]{1,0} fusion(%x, %ag), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/transpose(jvp(CLIP))/CLIP.encode_text/textual/encoder/block_0/mlp/add"}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %y)
}

%cond (p.1: (s32[], f32[8,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%fused (a: f32[8,16], b: f32[32,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%a), replica_groups={{0,1}}, to_apply=%add
  ROOT %m = f32[8,16]{1,0} multiply(%a, %ar)
}

ENTRY %main (x.0: f32[8,16]) -> f32[8,16] {
  %x.0 = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = bf16[8,16]{1,0} convert(%x.0)
}
"""


def test_hlo_multiplicity_collectives_and_bytes():
  m = hlo.parse(HLO)
  assert m.entry == "main" and set(m.computations) == {"body", "cond", "fused", "main"}
  mult = m.multiplicity()
  assert mult == {"main": 1.0, "body": 3.0, "cond": 1.0, "fused": 3.0}
  c = hlo.collectives(m, devices=8)
  # all-gather: 32x16 f32 result in groups of 4, three trips; all-reduce in groups of 2
  assert c["all-gather"] == {"bytes": 3 * 2048.0, "count": 3, "wire_bytes": 3 * 2048 * 3 / 4}
  assert c["all-reduce"] == {"bytes": 3 * 512.0, "count": 3, "wire_bytes": 3 * 512.0 * 2 / 2}
  ops = {ins.name: b for ins, b in hlo.op_bytes(m)}
  # the fusion reads x (512 B) and ag (2048 B) and writes 512 B, three times; the fused
  # computation's own ops are not top-level; convert reads 512 B and writes 256 B once
  assert ops["y"] == 3 * (512 + 2048 + 512) and ops["r"] == 512 + 256
  assert "ar" not in ops and "p" not in ops
  # the compiler's cost analysis counts the loop body once: scaled by the trip count
  assert hlo.loop_scale(m) == (ops["y"] + ops["ag"] + ops["r"]) / (
      (ops["y"] + ops["ag"]) / 3 + ops["r"])
  parts = hlo.bytes_by_part(m)
  assert parts["text MLP bwd"] == ops["y"] and parts["image attention fwd"] == ops["ag"]


HLO_NO_TRIP_COUNT = """HloModule m2

%cond2 (p.2: (s32[], f32[8,16])) -> pred[] {
  %p.2 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i2 = s32[] get-tuple-element(%p.2), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i2, %n), direction=LT
}

%body2 (p.3: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.3 = (s32[], f32[8,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%p.3), index=0
  %two = s32[] constant(2)
  %j2 = s32[] add(%j, %two)
  %z = f32[8,16]{1,0} get-tuple-element(%p.3), index=1
  %e = f32[8,16]{1,0} exponential(%z)
  ROOT %t2 = (s32[], f32[8,16]{1,0}) tuple(%j2, %e)
}

ENTRY %main2 (x.1: f32[8,16]) -> (s32[], f32[8,16]) {
  %x.1 = f32[8,16]{1,0} parameter(0)
  %one = s32[] constant(1)
  %init2 = (s32[], f32[8,16]{1,0}) tuple(%one, %x.1)
  ROOT %w2 = (s32[], f32[8,16]{1,0}) while(%init2), condition=%cond2, body=%body2
}
"""


def test_hlo_trip_count_inferred_from_the_loop_condition():
  # i = 1; while i < 7: i += 2  -> 3 trips (1, 3, 5), as the compiled TPU module writes loops
  m = hlo.parse(HLO_NO_TRIP_COUNT)
  (loop,) = [i for i in m.computations["main2"] if i.opcode == "while"]
  assert loop.trip_count == 3 and m.multiplicity()["body2"] == 3.0
  ops = {ins.name: b for ins, b in hlo.op_bytes(m)}
  assert ops["e"] == 3 * (512 + 512)


def test_part_of_labels():
  assert hlo.part_of("jit(s)/transpose(jvp(CLIP))/CLIP.encode_image/x/attn/dot") == \
      "image attention bwd"
  assert hlo.part_of("jit(s)/jvp(CLIP)/CLIP.encode_text/x/ln_1/add") == "text LayerNorm fwd"
  assert hlo.part_of("jit(s)/adam/mul") == "loss, optimizer, other"
  assert hlo.part_of("") == "XLA-created ops (no name scope)"


# ----------------------------------------------------------------------------- roofline

def test_roofline_arithmetic():
  v5e = chips.by_name("v5e")
  r = report.roofline(flops=197e12 * 0.1, bytes_accessed=819e9 * 0.4, wire_bytes=400e9 * 0.05,
                      chip=v5e, model_flops=197e12 * 0.08)
  assert r["bound"] == "memory" and math.isclose(r["roofline_s"], 0.4)
  assert math.isclose(r["compute_s"], 0.1) and math.isclose(r["ici_s"], 0.05)
  assert math.isclose(r["roofline_mfu"], 0.08 / 0.4)
  v4 = chips.by_name("v4")  # no published ICI figure: no ICI bound
  assert report.roofline(1.0, 1.0, 1e30, v4, None)["ici_s"] is None


# ----------------------------------------------------------------------------- compile mode

def _config(micro, **kw):
  c = micro(**{"mode": "compile", "mesh.num_devices": 0, **kw})
  c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
  return c


def test_compile_mode_tiny_train_step_v5e_2x2(micro, tmp_path):
  from qtx import modes
  c = _config(micro)
  c.compile.topology = "v5e:2x2"
  out = modes.run(c, str(tmp_path))
  (rec,) = json.loads((tmp_path / "compile.json").read_text())["programs"]
  for key in ("topology", "device_kind", "chips", "hosts", "per_chip_batch", "microbatches",
              "hbm_bytes", "argument_bytes", "temp_bytes", "output_bytes", "fits", "flops",
              "bytes_accessed", "collective_bytes", "roofline_s", "roofline_mfu", "bound",
              "compile_s"):
    assert key in rec, key
  assert (rec["topology"], rec["chips"], rec["hosts"], rec["device_kind"]) == \
      ("v5e:2x2", 4, 1, "TPU v5 lite")
  assert rec["per_chip_batch"] == c.train.batch_size // 4 and rec["fits"] is True
  assert rec["hbm_bytes"] == 16 * 2**30
  # the record is the compiled object's: compile the same program again and compare
  devs = topology.devices(topology.parse("v5e:2x2"))
  from qtx import run as run_lib
  prog = programs.train(c, run_lib.build(c, train=True, devices=devs, validate=False))
  compiled = prog.fn.lower(*prog.args).compile()
  mem = compiled.memory_analysis()
  assert rec["argument_bytes"] == mem.argument_size_in_bytes
  assert rec["temp_bytes"] == mem.temp_size_in_bytes
  assert rec["output_bytes"] == mem.output_size_in_bytes
  ca = compiled.cost_analysis()
  assert rec["compiler_flops"] == ca["flops"] and rec["loop_scale"] == 1.0  # no loops
  assert rec["bytes_accessed"] == ca["bytes accessed"]
  assert rec["flops"] == max(ca["flops"], rec["model_flops"])
  # data parallel over 4 chips: the gradients are all-reduced
  assert rec["collective_bytes"].get("all-reduce", 0) > 0
  assert rec["roofline_s"] == max(rec["flops"] / 197e12, rec["bytes_accessed"] / 819e9,
                                  rec["ici_s"])
  assert "| train | v5e:2x2 | 4 (1) |" in (tmp_path / "compile.md").read_text()
  parts = rec["bytes_by_part"]
  assert {"image attention fwd", "image attention bwd", "text MLP bwd"} <= set(parts)
  assert sum(parts.values()) == pytest.approx(
      sum(b for _, b in hlo.op_bytes(hlo.parse(compiled.as_text()))), rel=1e-9)
  assert out["programs"][0]["fits"]


@pytest.mark.slow
def test_compile_four_hosts_data_fsdp_tensor_with_pallas_attention(micro, tmp_path):
  from qtx import modes
  c = _config(micro)
  c.mesh.shape = {"data": 2, "fsdp": 4, "tensor": 2}
  c.train.batch_size = 32
  for t in (c.model.image, c.model.text):
    t.attention.impl = "pallas"
  c.compile.topology = "v5e:4x4"
  c.compile.what = "train,encode_image"
  modes.run(c, str(tmp_path))
  recs = json.loads((tmp_path / "compile.json").read_text())["programs"]
  assert [(r["program"], r["chips"], r["hosts"]) for r in recs] == \
      [("train", 16, 4), ("encode_image", 16, 4)]
  assert all(r["fits"] for r in recs)
  kinds = recs[0]["collective_bytes"]
  assert kinds.get("all-gather", 0) > 0 and kinds.get("all-reduce", 0) + kinds.get(
      "reduce-scatter", 0) > 0  # FSDP gathers weights; the gradients are reduced


def test_auto_microbatches_fit_a_smaller_memory(micro, v5e_2x2):
  c = _config(micro)
  c.train.batch_size = 64
  one = fit.compile_train(fit.with_batch(c, 64, 1), v5e_2x2)
  two = fit.compile_train(fit.with_batch(c, 64, 2), v5e_2x2)
  assert two["used_bytes"] < one["used_bytes"]
  v5e = chips.by_name("v5e")
  # a chip whose HBM holds the 2-microbatch step but not the 1-microbatch one
  hbm = int((one["used_bytes"] + two["used_bytes"]) / 2 / (1 - report.DEFAULT_HEADROOM))
  small = chips.Chip("v5e", v5e.kinds, v5e.bf16_flops, hbm, v5e.hbm_bw, v5e.ici_bw, "test")
  c.train.microbatches = 0
  logs = []
  m, tries = fit.choose_microbatches(c, v5e_2x2, chip=small, log=logs.append)
  assert m == 2 and [t["microbatches"] for t in tries] == [1, 2] and len(logs) == 2
  tiny = chips.Chip("v5e", v5e.kinds, v5e.bf16_flops, 1 << 20, v5e.hbm_bw, v5e.ici_bw, "test")
  with pytest.raises(ValueError, match="does not fit.*train.batch_size"):
    fit.choose_microbatches(c, v5e_2x2, chip=tiny, log=logs.append)


def test_find_batch_is_the_largest_multiple_that_fits(micro, v5e_2x2):
  c = _config(micro)
  used = {b: fit.compile_train(fit.with_batch(c, b * 4, 1), v5e_2x2)["used_bytes"]
          for b in (16, 24)}
  assert used[16] < used[24]
  v5e = chips.by_name("v5e")
  hbm = int((used[16] + used[24]) / 2 / (1 - report.DEFAULT_HEADROOM))
  small = chips.Chip("v5e", v5e.kinds, v5e.bf16_flops, hbm, v5e.hbm_bw, v5e.ici_bw, "test")
  best, tries = fit.find_batch(c, v5e_2x2, chip=small, log=lambda _: None)
  assert best == 16
  tried = [t["per_chip_batch"] for t in tries]
  assert tried[:3] == [8, 16, 32] and 24 in tried and all(b % 8 == 0 for b in tried)


def test_microbatch_candidates():
  assert fit.microbatch_candidates(512, 8) == [1, 2, 4, 8, 16, 32, 64]
  assert fit.microbatch_candidates(24, 4) == [1, 2]
  assert fit.microbatch_candidates(6, 4) == []


def test_presets_choose_microbatches_and_compile_despite_synthetic_data():
  from qtx import config_lib
  c = config_lib.b16_config(None)
  assert c.train.microbatches == 0
  c.mode = "compile"
  config_lib.validate(c)  # the pod preset's refusal of synthetic data does not apply
  c.mode = "train"
  with pytest.raises(ValueError, match="refuses the embedded synthetic"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------- kernels

def _sharded(mesh, shape, dtype, spec):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


ATTN_CASES = [dict(), dict(causal=True), dict(gamma=-0.01), dict(sink=0.5),
              dict(softplus_p=1.0), dict(pad=True)]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: ",".join(c) or "softmax")
def test_attention_compiles_for_tpu_under_plain_jit_with_sharded_inputs(case, v5e_2x2):
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2,
                       devices=v5e_2x2)
  B, T, H, K = 4, 200, 4, 64
  q = _sharded(mesh, (B, T, H, K), jnp.bfloat16, P("data", None, "tensor", None))
  case = dict(case)
  km = None
  if case.pop("pad", False):
    km = _sharded(mesh, (B, T), jnp.bool_, P("data", None))

  def loss(q, k, v, km):
    return kernels.two_pass_attention(q, k, v, key_mask_BxS=km, **case).astype(
        jnp.float32).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, km).compile()
  text = compiled.as_text()
  assert "tpu_custom_call" in text  # Mosaic kernels, not the interpreter
  # each device runs its own shard: B/2 x H/2 per kernel call
  assert compiled.cost_analysis()["flops"] > 0


def _tile_count(T, S, bq, bk, causal, masked, key_major):
  nq, nk = -(-T // bq), -(-S // bk)
  if not (causal and masked):
    return nq * nk
  if key_major:
    return sum(nq - (j * bk) // bq for j in range(nk))
  return sum(-(-min((i + 1) * bq, S) // bk) for i in range(nq))


def test_attention_cost_estimates_equal_the_analytic_counts_and_the_compiler(v5e_2x2):
  B, T, H, K = 2, 256, 2, 128
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=v5e_2x2[:1])
  q = _sharded(mesh, (B, T, H, K), jnp.bfloat16, P())
  # forward on TPU: 128 x 128 blocks, all (2 x 2) tiles; 3 block matmuls and 2 exp2 per score
  fwd = jax.jit(lambda q, k, v: kernels.two_pass_attention(q, k, v)).lower(q, q, q).compile()
  ca = fwd.cost_analysis()
  assert ca["flops"] == 3 * 2 * B * H * T * T * K
  assert ca["transcendentals"] == 2 * B * H * T * T
  # the analytic count for a causal GPU-style (masked) plan visits only tiles up to the diagonal
  plan = attn_lib.make_plan(T, T, K, interpret=True, block_q=32, block_k=32)
  st = attn_lib._Static(plan, T, T, K, True, 1.0, 1.0)
  assert attn_lib.visited_tiles(st) == _tile_count(T, T, 32, 32, True, True, False) == 36
  assert attn_lib.visited_tiles(st, key_major=True) == 36
  x = jnp.zeros((B, T, H, K), jnp.float32)
  est = attn_lib.cost_estimate(st, "two_pass_attention_bwd_dkdv", B, H, (x, x, x),
                               [jax.ShapeDtypeStruct((B, T, H, K), jnp.float32)] * 2)
  assert est.flops == 4 * 2 * B * H * 36 * 32 * 32 * plan.head_block
  assert est.transcendentals == B * H * 36 * 32 * 32
  assert est.bytes_accessed == 5 * B * T * H * K * 4


def test_softmax_cost_estimates_equal_the_analytic_counts_and_the_compiler(v5e_2x2):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=v5e_2x2[:1])
  R, N = 64, 256
  x = _sharded(mesh, (R, N), jnp.float32, P())
  ca = jax.jit(kernels.two_pass_softmax).lower(x).compile().cost_analysis()
  assert (ca["flops"], ca["transcendentals"]) == (10 * R * N, 2 * R * N)
  g = jax.jit(jax.grad(lambda x: kernels.two_pass_softmax(x, gamma=-0.01).sum())).lower(
      x).compile().cost_analysis()
  # forward with the clip (13) + backward with the clip (13) FLOPs; 2 + 1 exponentials
  assert g["transcendentals"] == 3 * R * N
  assert g["flops"] >= (13 + 13) * R * N
  lse = jax.jit(kernels.logsumexp).lower(x).compile().cost_analysis()
  assert lse["transcendentals"] >= R * N and lse["flops"] >= 6 * R * N


def test_softmax_kernel_under_plain_jit_on_a_mesh_and_replicated_fallback(v5e_2x2):
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=v5e_2x2)
  x = _sharded(mesh, (8, 4, 128, 256), jnp.float32, P("data"))
  text = jax.jit(lambda x: kernels.two_pass_softmax(x, gamma=-0.01)).lower(x).compile().as_text()
  assert "tpu_custom_call" in text
  odd = _sharded(mesh, (6, 128), jnp.float32, P())  # 6 rows do not split over 4 devices
  text = jax.jit(kernels.two_pass_softmax).lower(odd).compile().as_text()
  assert "tpu_custom_call" in text


@pytest.mark.parametrize("what", ["attention", "attention_causal", "attention_clip",
                                  "attention_sink", "attention_softplus", "softmax",
                                  "softmax_clip", "logsumexp"])
def test_kernels_lower_for_cuda_with_target(what):
  from jax import export
  check = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  if what.startswith("attention"):
    kw = {"attention": {}, "attention_causal": {"causal": True},
          "attention_clip": {"gamma": -0.01}, "attention_sink": {"sink": 0.0},
          "attention_softplus": {"softplus_p": 1.0}}[what]
    args = [jax.ShapeDtypeStruct((2, 77, 2, 64), jnp.bfloat16)] * 3
    f = lambda q, k, v: kernels.two_pass_attention(q, k, v, **kw).astype(jnp.float32).sum()
    n_kernels = 3
  else:
    args = [jax.ShapeDtypeStruct((16, 200), jnp.float32)]
    f = {"softmax": lambda x: kernels.two_pass_softmax(x).sum(),
         "softmax_clip": lambda x: kernels.two_pass_softmax(x, gamma=-0.1).sum(),
         "logsumexp": lambda x: kernels.logsumexp(x).sum()}[what]
    n_kernels = 2 if what != "logsumexp" else 1
  g = jax.grad(f, argnums=tuple(range(len(args))))
  with kernels.target("gpu"):
    exp = export.export(jax.jit(g), platforms=("cuda",), disabled_checks=check)(*args)
  assert exp.platforms == ("cuda",)
  assert exp.mlir_module().count("xla.gpu.triton") >= n_kernels
  jax.clear_caches()  # the next test must not get a kernel traced for CUDA


def test_target_refuses_unknown_platforms():
  with pytest.raises(ValueError, match="unsupported platform"):
    with kernels.target("npu"):
      pass


def test_cli_compile_mode_summary_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "qtx.main", "--config", "configs/clip_tiny.py", "--workdir",
         str(tmp_path), "--config.mode=compile", "--config.compile.topology=v5e-4",
         "--config.compile.what=eval"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith("qtx compile v5e:2x2:")]
  assert len(lines) == 1 and "encode_image: fits" in lines[0]
  assert "Failed to find host bounds" not in out.stderr  # libtpu's warnings are silenced
  bad = subprocess.run(cmd[:-2] + ["--config.compile.topology=v5e:3"], cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "compile.topology 'v5e:3'" in bad.stderr
