"""Extra zero-shot evaluators (eval.zeroshot) and the MLP activation choice."""
import jax
import numpy as np
import pytest

from conftest import micro_config
from qtx import config_lib, metrics
from qtx.nn.transformer import Mlp
from qtx.modes import train as train_mode


def test_extra_zeroshot_evaluator_is_logged_under_its_name(tmp_path):
  c = micro_config(**{"train.total_steps": 2, "eval.zeroshot": "synthetic"})
  out = train_mode.run(c, str(tmp_path))
  last = metrics.read(str(tmp_path))[-1]
  assert "eval/synthetic/zeroshot_top1" in last and "eval/zeroshot_top1" in last
  # the same data and model: the extra evaluator reproduces the main one exactly
  assert last["eval/synthetic/zeroshot_top1"] == last["eval/zeroshot_top1"]
  assert out["eval/synthetic/i2t_r1"] == out["eval/i2t_r1"]


@pytest.mark.parametrize("name,ref", [
    ("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True)),
    ("gelu", lambda x: jax.nn.gelu(x, approximate=False)),
    ("quick_gelu", lambda x: x * jax.nn.sigmoid(1.702 * x)),
])
def test_mlp_activation(name, ref):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  m = Mlp(16, activation=name)
  v = m.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, v["params"],
                   is_leaf=lambda a: hasattr(a, "value"))
  h = ref(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  np.testing.assert_allclose(m.apply(v, x), h @ p["fc2"]["kernel"] + p["fc2"]["bias"],
                             rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_a_clear_error():
  c = micro_config()
  c.model.image.activation = "relu"
  with pytest.raises(ValueError, match=r"unknown model.image.activation 'relu'"):
    config_lib.validate(c)


def test_outliers_logged_during_training(tmp_path):
  c = micro_config(**{"train.total_steps": 4, "quant.outliers_every_steps": 2})
  train_mode.run(c, str(tmp_path))
  rows = [r for r in metrics.read(str(tmp_path)) if "outliers/max_inf_norm" in r]
  assert [r["step"] for r in rows] == [2, 4]
  r = rows[-1]
  per_layer = [v for k, v in r.items() if k.startswith("outliers/image/inf_norm/block_")]
  assert len(per_layer) == 4  # 2 layers x (block_out, ffn_out)
  assert r["outliers/max_inf_norm"] == max(r["outliers/image/max_inf_norm"],
                                          r["outliers/text/max_inf_norm"])


def _np_multi_caption_recalls(zi, zt, cap, k):
  """Brute force, from the definitions: full similarity matrix and sorted lists."""
  sim = zi @ zt.T
  i2t = np.mean([bool(set(np.argsort(-sim[i], kind="stable")[:k]) & set(np.where(cap == i)[0]))
                 for i in range(len(zi))])
  t2i = np.mean([cap[j] in np.argsort(-sim[:, j], kind="stable")[:k] for j in range(len(zt))])
  return i2t, t2i


def test_five_caption_retrieval_equals_numpy_reference():
  from qtx import evaluate
  rng = np.random.default_rng(0)
  N, per = 37, 5
  zi = rng.normal(size=(N, 8))
  cap = np.repeat(np.arange(N), per)
  rng.shuffle(cap)  # captions in any order
  zt = zi[cap] + rng.normal(scale=1.5, size=(N * per, 8))  # noisy views of their images
  zi /= np.linalg.norm(zi, axis=1, keepdims=True)
  zt /= np.linalg.norm(zt, axis=1, keepdims=True)
  got = evaluate.retrieval_recalls(zi, zt, cap, ks=(1, 5, 10), block=7)  # several blocks
  for k in (1, 5, 10):
    i2t, t2i = _np_multi_caption_recalls(zi, zt, cap, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1  # the case is not trivial
  # one caption per image (identity mapping) is the classic recall, in blocks or not
  z1 = zt[:N]
  a = evaluate.retrieval_recalls(zi, z1, None, block=5)
  b = evaluate.retrieval_recalls(zi, z1, np.arange(N), block=1000)
  assert a == b
  with pytest.raises(ValueError, match="have no caption"):
    evaluate.retrieval_recalls(zi, zt[:10], cap[:10])


def test_blockwise_zeroshot_equals_full_matrix_topk():
  from qtx import evaluate
  rng = np.random.default_rng(1)
  zi, zc = rng.normal(size=(101, 6)), rng.normal(size=(13, 6))
  labels = rng.integers(0, 13, 101)
  got = evaluate.zeroshot_accuracy(zi, zc, labels, ks=(1, 5), block=16)
  scores = zi @ zc.T
  for k in (1, 5):
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert got[f"zeroshot_top{k}"] == pytest.approx(np.mean(np.any(top == labels[:, None], 1)))


def test_summary_line_names_each_extra_zeroshot_evaluator():
  line = metrics.summary_line("qtx", 7, {"train/loss": 1.5, "eval/zeroshot_top1": 0.25,
                                         "eval/imagefolder/zeroshot_top1": 0.5,
                                         "eval/fashion_mnist/zeroshot_top1": 0.125,
                                         "eval/imagefolder/num_samples": 10})
  assert line == ("qtx: step 7 | loss 1.5000 | zero-shot top-1 25.0% | fashion_mnist zero-shot "
                  "top-1 12.5% | imagefolder zero-shot top-1 50.0%")
