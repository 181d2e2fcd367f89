"""Pretrained CLIP weight import: name/layout mapping, shape checks, gates, file formats, and
parity with open_clip (when torch and open_clip_torch are installed)."""
import json
import math
import struct
import warnings

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from qtx import config_lib, weights
from qtx.nn import vit
from qtx.run import build_model
from qtx import run as run_lib
from conftest import micro_config

MEAN = np.asarray(vit.CLIP_MEAN)
STD = np.asarray(vit.CLIP_STD)


def fake_state_dict(seed=0, width=32, depth=2, patch=8, image=16, t_width=32, t_depth=1,
                    ctx=16, vocab=1000, embed=16, mlp=4):
  """Random weights under OpenAI CLIP names and torch layouts."""
  rng = np.random.default_rng(seed)

  def r(*shape, s=0.05):
    return (rng.standard_normal(shape) * s).astype(np.float32)

  sd = {"visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width, s=0.2),
        "visual.positional_embedding": r((image // patch) ** 2 + 1, width, s=0.1),
        "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed, s=0.2),
        "token_embedding.weight": r(vocab, t_width, s=0.1),
        "positional_embedding": r(ctx, t_width, s=0.05),
        "ln_final.weight": 1 + r(t_width), "ln_final.bias": r(t_width),
        "text_projection": r(t_width, embed, s=0.2),
        "logit_scale": np.asarray(math.log(1 / 0.07), np.float32)}
  for prefix, d, n in (("visual.", width, depth), ("", t_width, t_depth)):
    for i in range(n):
      p = f"{prefix}transformer.resblocks.{i}."
      sd.update({p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d),
                 p + "attn.in_proj_weight": r(3 * d, d, s=0.15), p + "attn.in_proj_bias": r(3 * d),
                 p + "attn.out_proj.weight": r(d, d, s=0.15), p + "attn.out_proj.bias": r(d),
                 p + "ln_2.weight": 1 + r(d), p + "ln_2.bias": r(d),
                 p + "mlp.c_fc.weight": r(mlp * d, d, s=0.1), p + "mlp.c_fc.bias": r(mlp * d),
                 p + "mlp.c_proj.weight": r(d, mlp * d, s=0.1), p + "mlp.c_proj.bias": r(d)})
  return sd


def config_for(sd, preset="softmax", **overrides):
  c = micro_config(preset, **overrides)
  weights.set_model_config(c, weights.infer_config(sd, head_dim=16))
  return c


def template(c, seed=0):
  """(model, params-shaped tree of random float32 numpy arrays) without compiling the init."""
  model = build_model(c)
  img = jax.ShapeDtypeStruct((1, c.model.image.image_size, c.model.image.image_size, 3),
                             np.uint8)
  tok = jax.ShapeDtypeStruct((1, c.model.text.context_length), np.int32)
  shapes = jax.eval_shape(lambda i, t: nn.meta.unbox(model.init(jax.random.key(0), i, t)
                                                     ["params"]), img, tok)
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), shapes)


_EMBED_FNS = {}


def embed(model, params, images, tokens):
  """(image, text) embeddings; one jitted function per model configuration."""
  key = repr(model)
  if key not in _EMBED_FNS:
    _EMBED_FNS[key] = jax.jit(lambda p, i, t: (
        model.apply({"params": p}, i, method=model.encode_image),
        model.apply({"params": p}, t, method=model.encode_text)))
  zi, zt = _EMBED_FNS[key](params, images, tokens)
  return np.asarray(zi), np.asarray(zt)


def inputs(c, n=3, seed=1):
  rng = np.random.default_rng(seed)
  s, T = c.model.image.image_size, c.model.text.context_length
  images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
  tokens = rng.integers(1, c.model.text.vocab_size - 1, (n, T)).astype(np.int32)
  tokens[np.arange(n), [3, 7, T - 1][:n]] = c.model.text.vocab_size - 1  # end-of-text
  return images, tokens


# ---------------------------------------------------------------------------------------------
# Layout mapping (numpy only)


def test_patch_kernel_matches_strided_convolution():
  rng = np.random.default_rng(0)
  W, C, P = 5, 3, 4
  conv = rng.standard_normal((W, C, P, P))
  x = rng.standard_normal((2, 8, 12, C))
  # Reference: the stride-P convolution (NCHW weights) written out.
  ref = np.einsum("bipjqc,wcpq->bijw", x.reshape(2, 2, P, 3, P, C), conv).reshape(2, 6, W)
  got = np.asarray(vit.patchify(x, P)) @ weights.patch_kernel(conv)
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_block_mapping_reproduces_torch_linear_layers():
  sd = fake_state_dict()
  used = set()
  blk = weights.convert_block(sd, "visual.transformer.resblocks.1", used)
  x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
  w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
  b = sd["visual.transformer.resblocks.1.attn.in_proj_bias"]
  qkv = x @ w.T + b  # torch: F.linear(x, in_proj_weight, in_proj_bias)
  for i, name in enumerate(("query", "key", "value")):
    got = x @ blk["attn"][name]["kernel"] + blk["attn"][name]["bias"]
    np.testing.assert_allclose(got, qkv[:, 32 * i:32 * (i + 1)], rtol=1e-6, atol=1e-6)
  fc = sd["visual.transformer.resblocks.1.mlp.c_fc.weight"]
  np.testing.assert_array_equal(blk["mlp"]["fc1"]["kernel"], fc.T)
  assert len(used) == 12


def test_infer_config_reads_architecture_from_shapes():
  sd = fake_state_dict(width=128, depth=3, patch=8, image=48, t_width=64, t_depth=2, ctx=20,
                       vocab=500, embed=24)
  arch = weights.infer_config(sd)
  assert arch == {"embed_dim": 24,
                  "image": {"image_size": 48, "patch_size": 8, "width": 128, "depth": 3,
                            "heads": 2, "mlp_dim": 512, "channels": 3, "ln_pre": True},
                  "text": {"vocab_size": 500, "context_length": 20, "width": 64, "depth": 2,
                           "heads": 1, "mlp_dim": 256}}
  assert "--config.model.image.width=128" in weights.config_overrides(arch)
  assert "--config.model.image.image_size=48" in weights.config_overrides(arch)
  c = config_lib.tiny_config()
  weights.set_model_config(c, arch)
  config_lib.validate(c)
  assert (c.model.image.depth, c.model.text.heads, c.model.image.image_size) == (3, 1, 48)
  with pytest.raises(ValueError, match="image width 128 is not a multiple of head_dim 48"):
    weights.infer_config(sd, head_dim=48)


def test_unsupported_checkpoints_are_named():
  sd = fake_state_dict()
  resnet = {k: v for k, v in sd.items() if not k.startswith("visual.conv1")}
  resnet["visual.layer1.0.conv1.weight"] = np.zeros((1,))
  with pytest.raises(ValueError, match="ResNet CLIP"):
    weights.infer_config(resnet)
  scaled = dict(sd)
  scaled["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(32, np.float32)
  c = config_for(sd)
  with pytest.raises(ValueError, match="no place for.*ls_1.gamma"):
    weights.convert(scaled, c)


# ---------------------------------------------------------------------------------------------
# Loading into a model


def _save_safetensors(path, sd, dtype="F32"):
  """Writes the safetensors layout directly (no safetensors package needed)."""
  header, blobs, offset = {}, [], 0
  np_dtype = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}[dtype]
  for k, v in sd.items():
    b = np.ascontiguousarray(np.asarray(v, np_dtype)).tobytes()
    header[k] = {"dtype": dtype, "shape": list(np.shape(v)), "data_offsets": [offset,
                                                                              offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_load_into_safetensors_roundtrip_and_shape_errors(tmp_path):
  sd = fake_state_dict()
  path = str(tmp_path / "clip.safetensors")
  _save_safetensors(path, sd)
  loaded = weights.load_state_dict(path)
  assert set(loaded) == set(sd)
  np.testing.assert_array_equal(loaded["visual.proj"], sd["visual.proj"])
  np.testing.assert_array_equal(weights.read_safetensors(path)["visual.proj"], sd["visual.proj"])
  c = config_for(sd)
  model, tmpl = template(c)
  params = weights.load_into(path, tmpl, c)
  np.testing.assert_array_equal(params["textual"]["token_embed"], sd["token_embedding.weight"])
  np.testing.assert_array_equal(params["visual"]["encoder"]["block_1"]["mlp"]["fc2"]["kernel"],
                                sd["visual.transformer.resblocks.1.mlp.c_proj.weight"].T)
  assert jax.tree.structure(params) == jax.tree.structure(tmpl)
  # A model of another width: every mismatching key is named with both shapes.
  c2 = config_for(sd)
  c2.model.image.width = 64
  _, tmpl2 = template(c2)
  with pytest.raises(ValueError, match=r"(?s)shape mismatches.*visual/cls_token: checkpoint "
                                       r"\(32,\) vs model \(64,\).*infer_config"):
    weights.load_into(path, tmpl2, c2)
  c3 = config_for(sd)
  c3.model.text.depth = 2
  _, tmpl3 = template(c3)
  with pytest.raises(ValueError, match="missing in the checkpoint.*textual/encoder/block_1"):
    weights.load_into(path, tmpl3, c3)


def test_bf16_safetensors_are_read_as_float32(tmp_path):
  sd = {"a": np.array([1.0, 1.0078125, 3.14159], np.float32)}
  path = str(tmp_path / "w.safetensors")
  _save_safetensors(path, sd, dtype="BF16")
  out = weights.load_state_dict(path)
  assert out["a"].dtype == np.float32
  np.testing.assert_array_equal(out["a"], [1.0, 1.0078125, 3.140625])


def test_scan_layout_gives_the_same_embeddings():
  sd = fake_state_dict()
  c = config_for(sd)
  model, _ = template(c)
  c_scan = config_for(sd, **{"model.scan": True})
  model_scan, tmpl_scan = template(c_scan)
  p = weights.convert(sd, c)
  p_scan = weights.merge_into_template(weights.convert(sd, c_scan), tmpl_scan, c_scan)
  assert p_scan["visual"]["encoder"]["blocks"]["block"]["attn"]["query"]["kernel"].shape == (
      2, 32, 32)
  x = inputs(c)
  for a, b in zip(embed(model, p, *x), embed(model_scan, p_scan, *x)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gated_import_preserves_the_function_and_fresh_does_not():
  sd = fake_state_dict()
  c = config_for(sd)
  model, tmpl = template(c)
  ref = embed(model, weights.merge_into_template(weights.convert(sd, c), tmpl, c), *inputs(c))
  cg = config_for(sd, "gated")
  cg.model.image.attention.gate_pi_init = 0.25
  model_g, tmpl_g = template(cg)
  conv = weights.convert(sd, cg)
  kept = weights.merge_into_template(conv, tmpl_g, cg, gate_init="preserve")
  gate = kept["visual"]["encoder"]["block_0"]["attn"]["gate"]
  assert (gate["kernel"] == 0).all()
  np.testing.assert_allclose(gate["bias"], math.log(0.25 / 0.75), rtol=1e-6)
  text_gate = kept["textual"]["encoder"]["block_0"]["attn"]["gate"]
  np.testing.assert_array_equal(text_gate["bias"], 0.0)  # text tower: pi_init 0.5
  np.testing.assert_allclose(kept["visual"]["encoder"]["block_0"]["attn"]["out"]["kernel"],
                             sd["visual.transformer.resblocks.0.attn.out_proj.weight"].T / 0.25,
                             rtol=1e-6)
  for a, b in zip(ref, embed(model_g, kept, *inputs(cg))):
    np.testing.assert_allclose(a, b, atol=2e-5)
  fresh = weights.merge_into_template(conv, tmpl_g, cg, gate_init="fresh")
  np.testing.assert_array_equal(fresh["visual"]["encoder"]["block_0"]["attn"]["gate"]["kernel"],
                                tmpl_g["visual"]["encoder"]["block_0"]["attn"]["gate"]["kernel"])
  assert np.abs(ref[0] - embed(model_g, fresh, *inputs(cg))[0]).max() > 1e-2
  with pytest.raises(ValueError, match="unknown gate_init 'open'"):
    weights.merge_into_template(conv, tmpl_g, cg, gate_init="open")


def test_logit_bias_kept_or_dropped():
  sd = fake_state_dict()
  c = config_for(sd, **{"loss.name": "siglip"})
  _, tmpl = template(c)
  tmpl["logit_bias"] = np.float32(-10.0)
  p = weights.merge_into_template(weights.convert(sd, c), tmpl, c)
  assert float(p["logit_bias"]) == -10.0  # kept from the template: not in the checkpoint
  sd["logit_bias"] = np.asarray(-7.0, np.float32)
  p = weights.merge_into_template(weights.convert(sd, c), tmpl, c)
  assert float(p["logit_bias"]) == -7.0
  c_clip = config_for(sd)
  _, tmpl_clip = template(c_clip)
  p = weights.merge_into_template(weights.convert(sd, c_clip), tmpl_clip, c_clip)
  assert "logit_bias" not in p


def test_init_from_a_weight_file(tmp_path):
  sd = fake_state_dict()
  path = str(tmp_path / "clip.safetensors")
  _save_safetensors(path, sd)
  c = config_for(sd)
  s = run_lib.build(c)
  params, step = run_lib.params_from(path, s, seed=0)
  np.testing.assert_array_equal(np.asarray(params["visual"]["patch_embed"]["kernel"]),
                                weights.patch_kernel(sd["visual.conv1.weight"]))
  assert step == 0 and s.tx is None  # parameters only: no optimizer is built
  # a softmax_sink model imports the same weights; its sink logits keep their initial value
  c = config_for(sd, **{"model.image.attention.normalizer": "softmax_sink",
                        "model.image.attention.sink_init": -1.0})
  params, _ = run_lib.params_from(path, run_lib.build(c), seed=0)
  blocks = [k for k in params["visual"]["encoder"] if k.startswith("block_")]
  for b in blocks:
    np.testing.assert_array_equal(np.asarray(params["visual"]["encoder"][b]["attn"]["sink"]),
                                  np.full((c.model.image.heads,), -1.0, np.float32))
  assert "sink" not in params["textual"]["encoder"][blocks[0]]["attn"]


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.load_state_dict(str(tmp_path / "nope.pt"))
  p = tmp_path / "w.npz"
  p.write_bytes(b"x")
  with pytest.raises(ValueError, match="unsupported checkpoint file.*safetensors"):
    weights.load_state_dict(str(p))


# ---------------------------------------------------------------------------------------------
# PyTorch formats


def test_torch_files_wrappers_and_torchscript(tmp_path):
  torch = pytest.importorskip("torch")
  sd = fake_state_dict()
  tsd = {k: torch.from_numpy(v).half() for k, v in sd.items()}
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in tsd.items()}},
             str(tmp_path / "ckpt.pt"))
  out = weights.load_state_dict(str(tmp_path / "ckpt.pt"))
  assert set(out) == set(sd) and out["visual.proj"].dtype == np.float32
  np.testing.assert_array_equal(out["visual.proj"], sd["visual.proj"].astype(np.float16))
  lin = torch.nn.Linear(3, 2).half()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
    torch.jit.save(torch.jit.script(lin), str(tmp_path / "jit.pt"))
  with pytest.raises(ValueError, match="TorchScript archive.*--allow_torchscript"):
    weights.load_state_dict(str(tmp_path / "jit.pt"))  # reading it would run its code
  assert weights.is_torchscript(str(tmp_path / "jit.pt"))
  out = weights.load_state_dict(str(tmp_path / "jit.pt"), allow_torchscript=True)
  assert set(out) == {"weight", "bias"} and out["weight"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Parity with open_clip


def _open_clip_model_class():
  pytest.importorskip("torch")
  import importlib.util
  if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip_torch is not installed (pip install open_clip_torch --no-deps)")
  return weights.open_clip_model_class()


@pytest.mark.parametrize("preset", ["softmax", "gated"])
def test_parity_with_open_clip(tmp_path, preset):
  torch = pytest.importorskip("torch")
  OpenClip = _open_clip_model_class()
  torch.manual_seed(0)
  ref = OpenClip(embed_dim=32,
                 vision_cfg=dict(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=2,
                               layers=2)).eval()
  for m in ref.modules():  # qtx's MLP uses tanh-approximate GELU
    if isinstance(m, torch.nn.GELU):
      m.approximate = "tanh"
  path = str(tmp_path / "open_clip.pt")
  torch.save(ref.state_dict(), path)
  sd = weights.load_state_dict(path)
  arch = weights.infer_config(sd)
  assert arch["image"]["heads"] == 2 and arch["text"]["heads"] == 2
  c = micro_config(preset)
  weights.set_model_config(c, arch)
  model, tmpl = template(c)
  params = weights.load_into(path, tmpl, c)
  from qtx.data import tokenizer
  tokens = tokenizer.tokenize(["a photo of a cat.", "a diagram", "two dogs on a red sofa",
                               "x"], 16).astype(np.int32)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  zi, zt = embed(model, params, images, tokens)
  x = ((images / 255.0 - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ri = ref.encode_image(torch.from_numpy(x), normalize=True).numpy()
    rt = ref.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()
  np.testing.assert_allclose(zi, ri, atol=1e-4, rtol=0)
  np.testing.assert_allclose(zt, rt, atol=1e-4, rtol=0)
  assert np.abs(zi - ri).max() < 1e-5 and np.abs(zt - rt).max() < 1e-5  # float32 round-off
  np.testing.assert_allclose(float(params["logit_scale"]), float(ref.logit_scale.detach()),
                             rtol=1e-6)


def test_command_line_prints_architecture_and_flags(tmp_path, capsys):
  sd = fake_state_dict()
  path = str(tmp_path / "clip.safetensors")
  _save_safetensors(path, sd)
  assert weights.main([path, "--head_dim", "16"]) == 0
  cap = capsys.readouterr()
  out = cap.out.strip().splitlines()
  flags = out[-1].split()
  assert json.loads("\n".join(out[:-1])) == {**weights.infer_config(sd, head_dim=16),
                                              "activation": None}
  assert "--config.model.image.heads=2" in flags and f"--config.init_from={path}" in flags
  # shapes cannot tell the activation: no flag for it, and a note that says what to pass
  assert not any("activation" in f for f in flags)
  assert "cannot tell QuickGELU from GELU" in cap.err and "--activation" in cap.err
  assert weights.main([path, "--head_dim", "16", "--activation", "gelu"]) == 0
  flags = capsys.readouterr().out.strip().splitlines()[-1].split()
  assert {"--config.model.image.activation=gelu", "--config.model.text.activation=gelu"} <= set(flags)


def test_openai_checkpoints_are_recognised_as_quick_gelu(tmp_path, capsys):
  sd = fake_state_dict()
  sd.update(input_resolution=np.asarray(16), context_length=np.asarray(16),
            vocab_size=np.asarray(1000))
  path = str(tmp_path / "openai.safetensors")
  _save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
  assert weights.main([path, "--head_dim", "16"]) == 0
  flags = capsys.readouterr().out.strip().splitlines()[-1].split()
  assert "--config.model.text.activation=quick_gelu" in flags
  # a contradicting --activation is an error that names the reason
  assert weights.main([path, "--head_dim", "16", "--activation", "gelu"]) == 2
  assert "OpenAI" in capsys.readouterr().err
  c = config_for(sd)
  msgs = weights.activation_warnings(c, *weights.checkpoint_activation(sd, path))
  assert len(msgs) == 2 and "activation=quick_gelu" in msgs[0]
  for t in (c.model.image, c.model.text):
    t.activation = "quick_gelu"
  assert weights.activation_warnings(c, *weights.checkpoint_activation(sd, path)) == []
  # unknown activation and the default: a warning that it cannot be confirmed
  msgs = weights.activation_warnings(config_for(sd), None, "the file cannot tell")
  assert len(msgs) == 2 and "cannot be confirmed" in msgs[0]


def test_torchscript_archives_need_an_explicit_opt_in(tmp_path, capsys):
  """A TorchScript archive (a zip with code/) is refused without running anything from it."""
  import zipfile
  path = str(tmp_path / "ViT-B-16.pt")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("ViT-B-16/code/__torch__/clip/model.py", "raise SystemExit('ran code')\n")
    z.writestr("ViT-B-16/data.pkl", b"not read")
  assert weights.is_torchscript(path)
  assert weights.checkpoint_activation({}, path)[0] == "quick_gelu"
  with pytest.raises(ValueError, match="TorchScript archive.*--allow_torchscript --save"):
    weights.load_state_dict(path)
  assert weights.main([path]) == 2
  assert "runs code stored in the file" in capsys.readouterr().err


def test_save_writes_safetensors_that_read_back(tmp_path, capsys):
  sd = fake_state_dict()
  src = str(tmp_path / "in.safetensors")
  _save_safetensors(src, sd)
  out = str(tmp_path / "out.safetensors")
  assert weights.main([src, "--head_dim", "16", "--activation", "gelu", "--save", out]) == 0
  assert f"--config.init_from={out}" in capsys.readouterr().out
  back = weights.read_safetensors(out)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v)
