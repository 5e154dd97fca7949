"""Dataset Decomposition: power-of-two pieces of single documents, bucketed by length (numpy).

Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (NeurIPS 2024, arXiv:2405.13226; apple/ml-dataset-decomposition
`scripts/make_dd_buckets.py`, `scripts/get_dd_params.py`).

Decomposition. A framed document `[bos] + tokens + [eos]` of `n` tokens has `n - 1` next-token
pairs. Their count is written in binary and each set bit `2^k` with `min_log2 <= k` becomes a
piece: `2^k` consecutive input tokens `doc[s : s + 2^k]` with targets `doc[s + 1 : s + 2^k + 1]`,
largest piece first, consecutive pieces sharing one token (the last target of a piece is the first
input of the next), so a document of 13 pairs gives pieces 8, 4, 1 and no pair is lost except the
bits below `2^min_log2`. Counts above `2^(max_log2 + 1) - 1` first give as many `2^max_log2`
pieces as fit. (The reference draws `k` at random when the document is longer than the largest
bucket; this module is deterministic.) Every piece is a contiguous slice of one document, so there
is no cross-document attention and no padding.

Batches. Bucket `D_k` holds the pieces of length `2^k`. A batch holds `tokens_per_batch / 2^k`
pieces of one bucket, so every batch has the same number of tokens (the reference's
`--dataset-batch-mult 32 16 8 4 2 1`). Within a bucket, pieces are taken in an order reshuffled at
every pass over the bucket (seeded), without end.

Curriculum. The paper samples the bucket of each step with odds that favour short sequences
("Grow-P2": odds 32:16:8:4:2:1 over 256..8192, the repository's `--train-data-mix-weights`) and
draws batches without replacement within a cycle, so the mix drifts from short to long sequences
as the short buckets run out. That drift depends on every bucket's global size, which a process
holding one shard of the data does not know, and the bucket of a step must be the same on every
process (equal batch shapes), so here the drift is an explicit schedule of the step alone. With
`m` buckets (index `i = 0` the shortest), `u = min(step / curriculum_steps, 1)` and
`base = curriculum_base`, the probability of bucket `i` at `step` is

- `uniform`: `1 / m`;
- `grow`: proportional to `base ** ((1 - 2u) * (m - 1 - i))`: Grow-P`base` odds at step 0
  (`base ** (m - 1 - i)`, e.g. 32:16:8:4:2:1), uniform at `u = 1/2`, the mirror image (long
  sequences favoured) from `curriculum_steps` on;
- `shrink`: the same with `i` replaced by `m - 1 - i` (long first).

The bucket of step `s` is drawn with `np.random.default_rng([seed, s])`, so it does not depend on
the process or on the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lcjax.data.packing import frame_document, make_positions_np, row_loss_weights

CURRICULA = ("uniform", "grow", "shrink")

__all__ = [
  "CURRICULA",
  "DecomposedBatcher",
  "binary_decomposition",
  "curriculum_probabilities",
  "decompose_document",
]


def binary_decomposition(length: int, min_log2: int, max_log2: int) -> list[int]:
  """Returns the piece lengths (powers of two, largest first) that `length` decomposes into.

  >>> binary_decomposition(13, 0, 10)
  [8, 4, 1]
  """
  if not 0 <= min_log2 <= max_log2:
    raise ValueError(f"need 0 <= min_log2 <= max_log2, got min_log2={min_log2}, max={max_log2}")
  largest = 1 << max_log2
  pieces = [largest] * (length // largest)
  rest = length % largest
  for k in range(max_log2 - 1, min_log2 - 1, -1):
    if rest & (1 << k):
      pieces.append(1 << k)
  return pieces


def decompose_document(num_tokens: int, min_log2: int, max_log2: int) -> list[tuple[int, int]]:
  """Returns `(start, length)` input windows of a framed document of `num_tokens` tokens.

  Window `(s, L)` has inputs `doc[s : s + L]` and targets `doc[s + 1 : s + L + 1]`.
  """
  windows = []
  start = 0
  for length in binary_decomposition(max(num_tokens - 1, 0), min_log2, max_log2):
    windows.append((start, length))
    start += length
  return windows


def curriculum_probabilities(
  curriculum: str, step: int, num_buckets: int, *, base: float = 2.0, steps: int = 1
) -> np.ndarray:
  """Returns the bucket probabilities `[num_buckets]` (shortest first) at `step`; see module doc."""
  if curriculum not in CURRICULA:
    raise ValueError(
      f"decomposition curriculum {curriculum!r} is unknown; choose one of {', '.join(CURRICULA)}"
    )
  i = np.arange(num_buckets, dtype=np.float64)
  if curriculum == "uniform" or num_buckets == 1:
    return np.full(num_buckets, 1.0 / num_buckets)
  if curriculum == "shrink":
    i = i[::-1]
  u = min(max(step, 0) / max(steps, 1), 1.0)
  logits = (1.0 - 2.0 * u) * (num_buckets - 1 - i) * np.log(base)
  odds = np.exp(logits - logits.max())
  return odds / odds.sum()


class DecomposedBatcher:
  """Yields constant-token batches of single-document power-of-two pieces; checkpointable.

  Args:
    documents: finite random-access documents (`__getitem__`, `__len__`), e.g. a grain
      `MapDataset` holding this process's shard.
    encode: raw document -> int32 tokens without special tokens; `skip_errors` from it (and
      empty documents) skip the document, counted.
    min_log2, max_log2: bucket range; pieces of `2^min_log2 .. 2^max_log2` tokens.
    tokens_per_batch: tokens per batch, a multiple of `2^max_log2`.
    curriculum, curriculum_base, curriculum_steps: the bucket schedule (module doc).
    seed: seeds the bucket of each step and the order of pieces within each bucket.
    shuffle: shuffle the pieces of each bucket at every pass (else document order).

  Building the index encodes every document once (only the lengths are kept); batches re-encode
  the documents they use, with a small cache. Batches are dicts of `[tokens_per_batch / 2^k, 2^k]`
  arrays with the keys of packed rows; `segment_ids` are all 1 and every target is predicted.
  State: `{"step", "cursors" (pieces taken from each bucket), "counters"}`.
  """

  def __init__(
    self,
    documents: Any,
    encode: Callable[[Any], np.ndarray],
    *,
    bos_id: int,
    eos_id: int,
    min_log2: int,
    max_log2: int,
    tokens_per_batch: int,
    curriculum: str = "grow",
    curriculum_base: float = 2.0,
    curriculum_steps: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    position_scheme: str = "global",
    loss_weighting: str = "token",
    skip_errors: tuple[type[BaseException], ...] = (UnicodeError,),
    cache_size: int = 64,
  ):
    if tokens_per_batch % (1 << max_log2) or tokens_per_batch <= 0:
      raise ValueError(
        f"tokens_per_batch {tokens_per_batch} must be a positive multiple of 2^max_log2 = "
        f"{1 << max_log2}; change data.decomposition.tokens_per_batch"
      )
    curriculum_probabilities(curriculum, 0, 1)  # validates the name
    self._documents = documents
    self._encode = encode
    self._bos_id, self._eos_id = bos_id, eos_id
    self._log2s = list(range(min_log2, max_log2 + 1))
    self._tokens_per_batch = tokens_per_batch
    self._curriculum = (curriculum, float(curriculum_base), int(curriculum_steps))
    self._seed = int(seed)
    self._shuffle = shuffle
    self._position_scheme = position_scheme
    self._loss_weighting = loss_weighting
    self._skip_errors = tuple(skip_errors)
    self._cache: dict[int, np.ndarray] = {}
    self._cache_size = cache_size
    self._orders: dict[int, tuple[int, np.ndarray]] = {}
    self.index_stats = dict.fromkeys(
      ("documents", "skipped_empty", "skipped_undecodable", "dropped_tokens"), 0
    )
    self.buckets = self._build_index(min_log2, max_log2)
    for k, pieces in zip(self._log2s, self.buckets, strict=True):
      if len(pieces) == 0:
        raise ValueError(
          f"no document of this shard has {(1 << k) + 1} tokens for the 2^{k} bucket; "
          "lower data.decomposition.max_log2 or add longer documents"
        )
    self._step = 0
    self._cursors = [0] * len(self._log2s)
    self._counters = {"tokens": 0, "rows": 0}

  def _load(self, index: int) -> np.ndarray | None:
    if index in self._cache:
      return self._cache[index]
    try:
      tokens = np.asarray(self._encode(self._documents[index]), dtype=np.int32).reshape(-1)
    except self._skip_errors:
      return None
    doc = frame_document(tokens, self._bos_id, self._eos_id) if tokens.size else None
    if len(self._cache) >= self._cache_size:
      self._cache.pop(next(iter(self._cache)))
    self._cache[index] = doc
    return doc

  def _build_index(self, min_log2: int, max_log2: int) -> list[np.ndarray]:
    pieces: dict[int, list[tuple[int, int]]] = {k: [] for k in self._log2s}
    for index in range(len(self._documents)):
      try:
        tokens = self._encode(self._documents[index])
      except self._skip_errors:
        self.index_stats["skipped_undecodable"] += 1
        continue
      size = int(np.asarray(tokens).size)
      if size == 0:
        self.index_stats["skipped_empty"] += 1
        continue
      self.index_stats["documents"] += 1
      windows = decompose_document(size + 2, min_log2, max_log2)
      self.index_stats["dropped_tokens"] += size + 1 - sum(length for _, length in windows)
      for start, length in windows:
        pieces[length.bit_length() - 1].append((index, start))
    return [np.asarray(pieces[k], dtype=np.int64).reshape(-1, 2) for k in self._log2s]

  def _piece(self, bucket: int, position: int) -> tuple[int, int]:
    pieces = self.buckets[bucket]
    epoch, within = divmod(position, len(pieces))
    if self._shuffle:
      cached_epoch, order = self._orders.get(bucket, (-1, None))
      if cached_epoch != epoch:
        order = np.random.default_rng([self._seed, 1, bucket, epoch]).permutation(len(pieces))
        self._orders[bucket] = (epoch, order)
      within = int(order[within])
    doc, start = pieces[within]
    return int(doc), int(start)

  def bucket_at(self, step: int) -> int:
    """Returns the bucket index (0 = shortest) of the batch at `step`."""
    curriculum, base, steps = self._curriculum
    probs = curriculum_probabilities(curriculum, step, len(self._log2s), base=base, steps=steps)
    u = np.random.default_rng([self._seed, 0, step]).random()
    return int(min(np.searchsorted(np.cumsum(probs), u, side="right"), len(probs) - 1))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    bucket = self.bucket_at(self._step)
    length = 1 << self._log2s[bucket]
    rows = self._tokens_per_batch // length
    tokens_BL = np.empty((rows, length), dtype=np.int32)
    targets_BL = np.empty((rows, length), dtype=np.int32)
    for r in range(rows):
      doc_index, start = self._piece(bucket, self._cursors[bucket] + r)
      doc = self._load(doc_index)
      tokens_BL[r] = doc[start : start + length]
      targets_BL[r] = doc[start + 1 : start + length + 1]
    self._cursors[bucket] += rows
    self._step += 1
    self._counters["tokens"] += rows * length
    self._counters["rows"] += rows
    segment_ids_BL = np.ones((rows, length), dtype=np.int32)
    weights_BL = np.stack(
      [row_loss_weights(s, np.ones(length), self._loss_weighting) for s in segment_ids_BL]
    )
    return {
      "tokens": tokens_BL,
      "targets": targets_BL,
      "segment_ids": segment_ids_BL,
      "positions": make_positions_np(segment_ids_BL, self._position_scheme),
      "loss_weights": weights_BL.astype(np.float32),
    }

  @property
  def counters(self) -> dict[str, int]:
    """Index-time counts (documents, skips, `dropped_tokens`: pairs below the smallest bucket)
    plus the tokens and rows emitted so far."""
    return {**self.index_stats, **self._counters}

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "cursors": list(self._cursors), "counters": self.counters}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["cursors"]) != len(self._log2s):
      raise ValueError(
        f"the saved data state has {len(state['cursors'])} decomposition buckets but the config "
        f"has {len(self._log2s)}; restore with the min_log2/max_log2 it was saved with"
      )
    self._step = int(state["step"])
    self._cursors = [int(c) for c in state["cursors"]]
    self._counters = {key: int(state["counters"][key]) for key in ("tokens", "rows")}
