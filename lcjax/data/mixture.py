"""Weighted mixtures of row streams (pure numpy), e.g. ProLong's long/short data mix.

ProLong (Gao et al. 2024, "How to Train Long-Context Language Models (Effectively)",
arXiv:2410.02660, Sec. 3) trains on a token-level mix of long data (code repositories, books)
and high-quality short data. Here every source is packed into rows of its own and the mixture
picks, row by row, which source supplies the next row, so the weights are fractions of rows and
hence of tokens (all rows have the same length), as in ProLong.

The choice for draw `i` is a pure function of `(seed, i)`: draws come in blocks of
`block_size`; in each block the sampler uses stratified (systematic) sampling, i.e. the block
holds `floor` or `ceil` of `block_size * weight` draws of each source, in an order shuffled by
`np.random.default_rng([seed, block])`. Frequencies are therefore within one draw per block of
the weights, the order is random, and restoring a mixture needs only the number of draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["MixedStream", "MixtureSampler", "normalize_weights"]


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
  """Returns `weights / sum(weights)` as float64 after checking they are finite and >= 0."""
  weights = np.asarray(weights, dtype=np.float64)
  if weights.ndim != 1 or weights.size == 0:
    raise ValueError("mixture weights must be a non-empty list of numbers; give one per source")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
    raise ValueError(
      f"mixture weights {weights.tolist()} must be finite, non-negative and not all zero"
    )
  return weights / weights.sum()


class MixtureSampler:
  """Deterministic, random-access weighted choice of a source index for each draw."""

  def __init__(self, weights: Sequence[float], seed: int, *, block_size: int = 4096):
    self.probabilities = normalize_weights(weights)
    self._cdf = np.cumsum(self.probabilities)
    self._cdf[-1] = 1.0
    self._seed = int(seed)
    self._block_size = int(block_size)
    self._block_index = -1
    self._block: np.ndarray | None = None

  def _make_block(self, block_index: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, block_index])
    size = self._block_size
    u = (np.arange(size) + rng.random()) / size
    choices = np.searchsorted(self._cdf, u, side="right")
    choices = np.minimum(choices, len(self._cdf) - 1)
    return choices[rng.permutation(size)]

  def choice(self, index: int) -> int:
    """Returns the source index of draw `index`."""
    block_index, within = divmod(int(index), self._block_size)
    if block_index != self._block_index:
      self._block = self._make_block(block_index)
      self._block_index = block_index
    return int(self._block[within])

  def choices(self, start: int, count: int) -> np.ndarray:
    """Returns the source indices of draws `start, ..., start + count - 1`."""
    first, last = start // self._block_size, (start + count - 1) // self._block_size
    blocks = np.concatenate([self._make_block(b) for b in range(first, last + 1)])
    offset = start - first * self._block_size
    return blocks[offset : offset + count]


class MixedStream:
  """Interleaves several checkpointable row streams by `MixtureSampler` draws.

  Each stream needs `__next__`, `get_state()` and `set_state(state)` (e.g. `DocumentPacker`).
  State: `{"draws": number of rows taken, "sources": [state of each stream]}`.
  """

  def __init__(self, streams: Sequence[Any], weights: Sequence[float], seed: int):
    if len(streams) != len(weights):
      raise ValueError(f"got {len(streams)} mixture sources but {len(weights)} weights")
    self._streams = list(streams)
    self._sampler = MixtureSampler(weights, seed)
    self._draws = 0

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    source = self._sampler.choice(self._draws)
    row = next(self._streams[source])
    self._draws += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"draws": self._draws, "sources": [s.get_state() for s in self._streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["sources"]) != len(self._streams):
      raise ValueError(
        f"the saved data state has {len(state['sources'])} mixture sources but the config has "
        f"{len(self._streams)}; restore with the data.mixture the state was saved with"
      )
    self._draws = int(state["draws"])
    for stream, stream_state in zip(self._streams, state["sources"], strict=True):
      stream.set_state(stream_state)
