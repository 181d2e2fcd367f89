"""Input pipeline and evaluation metrics: exact values on hand-made inputs."""
import numpy as np
import pytest

from conftest import micro_config
from qtx import evaluate
from qtx.data import pipeline


def test_train_batches_are_uint8_and_tokenized():
  c = micro_config()
  it = iter(pipeline.train_dataset(c))
  b = next(it)
  assert b["image"].dtype == np.uint8 and b["image"].shape == (16, 16, 16, 3)
  assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (16, 16)
  assert np.all(b["tokens"][:, 0] == 49406)
  assert np.all(np.sum(b["tokens"] == 49407, axis=1) == 1)  # one end-of-text per caption


def test_process_slices_partition_the_global_batch():
  c = micro_config()
  full = next(iter(pipeline.train_dataset(c)))
  parts = [next(iter(pipeline.train_dataset(c, p, 2))) for p in range(2)]
  assert parts[0]["image"].shape[0] == 8
  # process p reads records p, p+2, ...: together the same records as one process
  np.testing.assert_array_equal(parts[0]["image"], full["image"][0::2])
  np.testing.assert_array_equal(parts[1]["tokens"], full["tokens"][1::2])
  with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
    pipeline.train_dataset(c, 0, 3)


def test_wrong_image_shape_from_a_source_is_a_clear_error():
  enc = pipeline.Encode(context_length=8, image_size=16)
  with pytest.raises(ValueError, match=r"image of shape \(20, 20, 3\).*uint8 \(16, 16, 3\)"):
    enc.map({"image": np.zeros((20, 20, 3), np.uint8), "caption": "x"})
  with pytest.raises(ValueError, match="float32"):
    enc.map({"image": np.zeros((16, 16, 3), np.float32), "caption": "x"})


def test_long_caption_is_truncated_keeping_end_of_text():
  enc = pipeline.Encode(context_length=8, image_size=16)
  out = enc.map({"image": np.zeros((16, 16, 3), np.uint8), "caption": "red " * 50})
  assert out["tokens"].shape == (8,) and out["tokens"][-1] == 49407


def test_eval_task_and_prompts():
  c = micro_config()
  task = pipeline.eval_task(c)
  assert task.images.shape == (64, 16, 16, 3) and task.labels.shape == (64,)
  p = task.prompt_tokens(16)
  assert p.shape == (len(task.class_names), len(task.templates), 16)


def test_recall_at_k_exact():
  sim = np.array([[0.9, 0.1, 0.0],
                  [0.8, 0.7, 0.0],   # own (0.7) is second
                  [0.5, 0.5, 0.5]])  # ties: counted as a stable sort would (rank 2)
  assert evaluate.recall_at_k(sim, 1) == pytest.approx(1 / 3)
  assert evaluate.recall_at_k(sim, 2) == pytest.approx(2 / 3)
  assert evaluate.recall_at_k(sim, 3) == 1.0


def test_topk_accuracy_exact():
  scores = np.array([[0.1, 0.9, 0.0], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]])
  labels = np.array([1, 1, 0])
  assert evaluate.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
  assert evaluate.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)


def test_encode_batched_pads_last_batch_and_keeps_order():
  calls = []

  def fn(x):
    calls.append(x.shape[0])
    return x * 2

  x = np.arange(10)[:, None].astype(np.float32)
  out = evaluate.encode_batched(fn, x, 4)
  np.testing.assert_array_equal(out, x * 2)
  assert calls == [4, 4, 4]


def test_caption_omission_reaches_the_train_source_only():
  c = micro_config()
  assert c.data.synthetic.omit_prob == 0.5
  c.data.synthetic.omit_prob = 0.25
  assert pipeline.make_source(c, "train").omit_prob == 0.25
  assert pipeline.make_source(c, "eval").omit_prob == 0.0  # eval captions name all attributes
  c.data.synthetic.omit_prob = 1.5
  from qtx import config_lib
  with pytest.raises(ValueError, match="omit_prob"):
    config_lib.validate(c)
