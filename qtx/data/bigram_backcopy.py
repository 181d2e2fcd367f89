"""The Bigram-Backcopy task (Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835): a text-only toy task on which
small causal transformers form an attention sink at the first token within minutes.

Sequences start with BOS (token 0). The other tokens 1..V-1 follow a bigram model whose rows are
drawn from Dirichlet(`concentration`), except after a trigger token (the `num_triggers` most
frequent tokens of the bigram's stationary distribution), where the next token copies the token
before the trigger:

    x_0 = BOS,   x_1 ~ pi over non-trigger tokens,
    x_{t+1} = x_{t-1}            if x_t is a trigger (t >= 1),
    x_{t+1} ~ P[x_t, :]          otherwise.

A head that copies must act at trigger positions ("active") and leave the residual unchanged
everywhere else ("dormant"), which softmax can only do by putting its attention on a token whose
value is (near) zero.

Batches are a pure function of (seed, index): any batch can be regenerated, so a run can restart
anywhere and every remedy of a study sees the same sequences.
"""
from __future__ import annotations

import dataclasses

import numpy as np

BOS = 0


@dataclasses.dataclass(frozen=True)
class BigramBackcopy:
  vocab_size: int = 64
  seq_len: int = 32
  num_triggers: int = 3
  concentration: float = 0.05
  seed: int = 0  # the task itself (transition matrix, triggers); batches add their own index

  def __post_init__(self):
    if self.vocab_size < self.num_triggers + 3:
      raise ValueError(f"vocab_size {self.vocab_size} is too small for {self.num_triggers} "
                       "triggers (needs BOS, the triggers and at least two other tokens)")
    if self.seq_len < 3:
      raise ValueError(f"seq_len must be >= 3, got {self.seq_len}")
    if not self.concentration > 0:
      raise ValueError(f"concentration must be > 0, got {self.concentration}")
    rng = np.random.default_rng([self.seed, 0xB16])
    n = self.vocab_size - 1  # tokens 1..V-1
    P = rng.dirichlet(np.full(n, self.concentration), size=n)
    # stationary distribution of the bigram chain (power iteration from uniform)
    pi = np.full(n, 1.0 / n)
    for _ in range(500):
      pi = pi @ P
    pi = pi / pi.sum()
    triggers = 1 + np.argsort(-pi, kind="stable")[:self.num_triggers]
    object.__setattr__(self, "_P", P)
    object.__setattr__(self, "_cum", np.cumsum(P, axis=1))
    object.__setattr__(self, "_pi", pi)
    object.__setattr__(self, "_triggers", np.sort(triggers))

  @property
  def triggers(self) -> np.ndarray:
    """The trigger tokens (ids in 1..V-1), sorted."""
    return self._triggers

  @property
  def transition(self) -> np.ndarray:
    """(V-1) x (V-1) bigram matrix over tokens 1..V-1 (row i: the token after i + 1)."""
    return self._P

  def batch(self, index: int, batch_size: int) -> np.ndarray:
    """int32 B x T tokens of batch `index` (deterministic)."""
    rng = np.random.default_rng([self.seed, 1, int(index)])
    B, T = batch_size, self.seq_len
    x = np.zeros((B, T), np.int32)
    start = self._pi.copy()
    start[self._triggers - 1] = 0.0
    start /= start.sum()
    x[:, 1] = 1 + _draw(rng, np.cumsum(start)[None, :].repeat(B, 0))
    is_trigger = np.zeros(self.vocab_size, bool)
    is_trigger[self._triggers] = True
    for t in range(1, T - 1):
      drawn = 1 + _draw(rng, self._cum[x[:, t] - 1])
      x[:, t + 1] = np.where(is_trigger[x[:, t]], x[:, t - 1], drawn)
    return x

  def trigger_mask(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """B x T bool: positions holding a trigger token (their next token is a copy)."""
    return np.isin(tokens_BxT, self._triggers)


def _draw(rng, cum_BxN):
  """One index per row from cumulative probabilities (the last entry ~1)."""
  u = rng.random(cum_BxN.shape[0]) * cum_BxN[:, -1]
  return np.minimum((cum_BxN < u[:, None]).sum(-1), cum_BxN.shape[1] - 1)
