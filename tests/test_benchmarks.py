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


def test_profile_ops_reads_a_real_trace():
  f = jax.jit(lambda s, b: (s + 1, jnp.tanh(b @ b.T).sum()))
  ops = bench.profile_ops(f, jnp.zeros(()), jnp.ones((64, 64)), steps=3)
  assert ops and all(v >= 0 for v in ops.values()) and sum(ops.values()) > 0
