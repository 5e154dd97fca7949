"""Dataset Decomposition: power-of-two pieces of single documents, bucketed by length (numpy).

Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (NeurIPS 2024, arXiv:2405.13226). The paper states the split and the curriculum in
words; the formulas below follow its code, apple/ml-dataset-decomposition at 9a23939:
`scripts/make_dd_buckets.py::get_binary` (lines 77-107, the split), `scripts/get_dd_params.py::main`
(lines 36-106, the sampling weights and cycles) and `open_lm.patch`, which adds
`open_lm/data.py::MyRandomMix` (patch lines 9-36, the sampler) and feeds it one cycle of batches
per bucket (`get_wds_dataset`, patch lines 74-119).

Decomposition. A framed document `[bos] + tokens + [eos]` of `n` tokens has `n - 1` next-token
pairs. While `r`, the pairs left, is at least `2^(max_log2 + 1)`, a piece of `2^k` pairs is cut
off the front with `k` drawn by `long_split`:

- `random` (default, `get_binary(randomize=True)`, the only call, line 150): `k` in
  `min_log2..max_log2` with `p(k) ∝ 2^(max_log2 - k)` (lines 90-91, 97-101), so the pieces of a
  long document carry equal expected tokens per bucket;
- `fixed` (`randomize=False`, line 103): `k = max_log2`.

The remaining `r < 2^(max_log2 + 1)` pairs are written in binary and each set bit `2^k` with
`k >= min_log2` becomes a piece, largest first (`get_binary`'s `k = int(log2(len(seq) - 1))`), so
13 pairs give pieces 8, 4, 1 and only the bits below `2^min_log2` are lost. The random split is
the default because the fixed one turns every long document into `2^max_log2` pieces: a
1M-token document puts 999K tokens in the 8K bucket where the reference puts about 167K in each
of the six buckets 256..8192 (in expectation), and since the curriculum weighs buckets by size
(below), the fixed split also shifts the schedule towards long sequences. The draws of document
`d` come from `np.random.default_rng([seed, 2, d])` (`d`: its index in this process's
documents), so the split is deterministic given the seed; the reference uses numpy's global
generator.

A piece of `2^k` pairs is `2^k` consecutive input tokens `doc[s : s + 2^k]` with targets
`doc[s + 1 : s + 2^k + 1]`. Consecutive pieces share one token (the last target of a piece is the
first input of the next), where the reference's pieces of `2^k + 1` tokens do not (`seq =
seq[(1 << k) + 1:]`, line 106), losing one pair per cut. Every piece is a contiguous slice of one
document: no cross-document attention and no padding.

Batches. Bucket `b` holds the `P_b` pieces of length `2^k_b`. A batch holds
`r_b = tokens_per_batch / 2^k_b` pieces of one bucket, so every batch has the same number of
tokens (the reference's `--dataset-batch-mult 32 16 8 4 2 1`). Each bucket is an endless stream of
batches: its pieces in an order reshuffled at every pass over the bucket (seeded), cut into
groups of `r_b`.

Curriculum (`CycleSampler`). Training runs in cycles, the reference's `--epochs` (README: "Number
of cycles"); `cycles_per_pass = C` cycles make one pass over the data. Cycle `c` takes the next

  `n_b(c) = floor((c + 1) P_b / (C r_b)) - floor(c P_b / (C r_b))`

batches of every bucket, each once, in a random order: step after step, bucket `b` is drawn with
probability

  `p_b ∝ o_b · n_b(c)` over the buckets that still have batches left in the cycle,

where `o_b` are the curriculum odds. These are `get_dd_params`'s `sampling_weights = odds ×
tokens per bucket per epoch` (lines 87-93; with constant tokens per batch, tokens ∝ batches),
passed to `MyRandomMix(probs=..., longest=True)`, whose `random_samples` keeps those weights fixed
for the whole cycle and deletes a bucket when it raises `StopIteration` (renormalizing over the
rest); each bucket's loader yields its cycle's batches once (`repeat(nepochs=1,
nbatches=num_worker_batches)`, patch lines 110-119). Buckets with high odds therefore run out
first and the mix drifts from short to long sequences within each cycle. The odds (`curriculum`,
shortest bucket first):

- `grow` (default): `base ** (m - 1 - i)` for bucket `i` of `m`; with `curriculum_base=2` these are
  the paper's Grow-P2 odds 32:16:8:4:2:1, the reference's `--train-data-mix-weights` default
  ("Pow-2 Curriculum", `get_dd_params.py` lines 186-188, README step 2);
- `shrink`: `base ** i` (long sequences first);
- `uniform`: all 1, so `p_b ∝ n_b`: batches in proportion to the data, not `1 / m`;
- a list of `m` positive numbers: those odds, as `--train-data-mix-weights` takes any list.

Deviations from the reference. (1) Cycle lengths: the reference sizes a cycle as
`--tokens / --epochs` (its `scripts/train_dd.sh` runs 8 cycles over about 0.83 of its data);
lcjax does not know the run's length here, so a cycle is `1 / cycles_per_pass` of a pass (default
one pass; 8 cycles over a one-pass run is `cycles_per_pass=8`). (2) `get_dd_params` rounds the
per-cycle counts to multiples of `sequence_per_shard × gpus × workers` and the loaders drop the
partial batch; here the floors above carry the partial batch into the next cycle, so no piece is
skipped. (3) `MyRandomMix` is seeded with the same `--seed` in every cycle; here step `t` of
cycle `c` draws from `np.random.default_rng([seed, 0, c, t])`, so cycles differ and a restored
state continues exactly.

Multiple processes. The bucket of a step must be the same on every process (equal batch shapes),
so every process must schedule with the same sizes `P_b`. The reference makes bucket sizes a
global input: `get_dd_params` reads them from the manifests of the whole dataset, every rank
computes the same per-worker batch counts from them and `MyRandomMix` is seeded alike on all
ranks ("make sure all nodes choose the same bucket", patch line 80). In lcjax each process
indexes only its own shard, so `DecomposedBatcher(agree_sizes=...)` takes a function that is
called once at index time with this process's `P_b` and returns the sizes all processes schedule
with; `lcjax.data.pipeline` passes `min_over_processes` (an all-gather, then the minimum, so no
process runs out of pieces within a cycle; processes holding more pieces carry them into later
cycles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from lcjax.data.packing import frame_document, make_positions_np, row_loss_weights

CURRICULA = ("grow", "shrink", "uniform")
LONG_SPLITS = ("random", "fixed")

__all__ = [
  "CURRICULA",
  "LONG_SPLITS",
  "CycleSampler",
  "DecomposedBatcher",
  "binary_decomposition",
  "curriculum_odds",
  "curriculum_probabilities",
  "decompose_document",
  "min_over_processes",
]

# Long documents draw their piece exponents in chunks of this many (fixed, so the draws of a
# document do not depend on anything but its length and generator).
_DRAW_CHUNK = 1024


def binary_decomposition(
  length: int, min_log2: int, max_log2: int, rng: np.random.Generator | None = None
) -> list[int]:
  """Returns the piece lengths (powers of two) that `length` next-token pairs decompose into.

  `make_dd_buckets.py::get_binary`: while `length` is at least `2^(max_log2 + 1)`, cut pieces of
  `2^k` with `k` drawn from `rng` with `p(k) ∝ 2^(max_log2 - k)` (`rng=None`: `k = max_log2`),
  then the binary digits of the rest, largest first, down to `2^min_log2`.

  >>> binary_decomposition(13, 0, 10)
  [8, 4, 1]
  """
  if not 0 <= min_log2 <= max_log2:
    raise ValueError(f"need 0 <= min_log2 <= max_log2, got min_log2={min_log2}, max={max_log2}")
  largest = 1 << max_log2
  pieces: list[int] = []
  rest = int(length)
  if rng is None:
    pieces = [largest] * (rest // largest)
    rest %= largest
  else:
    # get_binary's `ps = 2 ** arange(m) / sum` over `arange(max_log2, min_log2 - 1, -1)`.
    sizes = 1 << np.arange(max_log2, min_log2 - 1, -1, dtype=np.int64)
    probs = 2.0 ** np.arange(sizes.size)
    probs /= probs.sum()
    threshold = 2 * largest
    while rest >= threshold:
      drawn = sizes[rng.choice(sizes.size, size=_DRAW_CHUNK, p=probs)]
      before = rest - (np.cumsum(drawn) - drawn)  # pairs left before each draw
      taken = drawn[: int(np.count_nonzero(before >= threshold))]  # `before` is decreasing
      pieces.extend(taken.tolist())
      rest -= int(taken.sum())
  for k in range(max_log2, min_log2 - 1, -1):
    if rest & (1 << k):
      pieces.append(1 << k)
  return pieces


def decompose_document(
  num_tokens: int, min_log2: int, max_log2: int, rng: np.random.Generator | None = None
) -> list[tuple[int, int]]:
  """Returns `(start, length)` input windows of a framed document of `num_tokens` tokens.

  Window `(s, L)` has inputs `doc[s : s + L]` and targets `doc[s + 1 : s + L + 1]`; `rng` as in
  `binary_decomposition` (None: the fixed split of long documents).
  """
  windows = []
  start = 0
  for length in binary_decomposition(max(num_tokens - 1, 0), min_log2, max_log2, rng):
    windows.append((start, length))
    start += length
  return windows


def curriculum_odds(
  curriculum: str | Sequence[float], num_buckets: int, *, base: float = 2.0
) -> np.ndarray:
  """Returns the odds `[num_buckets]` (shortest bucket first) of a curriculum; see module doc."""
  if not isinstance(curriculum, str):
    odds_M = np.asarray(curriculum, dtype=np.float64).reshape(-1)
    if odds_M.size != num_buckets or not np.all(np.isfinite(odds_M)) or not np.all(odds_M > 0):
      raise ValueError(
        f"decomposition curriculum odds {list(curriculum)} must be {num_buckets} positive "
        "numbers, one per bucket (shortest first)"
      )
    return odds_M
  if curriculum not in CURRICULA:
    raise ValueError(
      f"decomposition curriculum {curriculum!r} is unknown; choose one of {', '.join(CURRICULA)} "
      "or give a list of odds"
    )
  i = np.arange(num_buckets, dtype=np.float64)
  if curriculum == "uniform":
    return np.ones(num_buckets)
  exponent_M = i if curriculum == "shrink" else num_buckets - 1 - i
  return float(base) ** exponent_M


def curriculum_probabilities(
  odds_M: np.ndarray, batches_M: np.ndarray, taken_M: np.ndarray | None = None
) -> np.ndarray:
  """Returns `p_b ∝ o_b · n_b` over the buckets with batches left (`taken_b < n_b`), else 0.

  `batches_M` are the batches of each bucket in the cycle (`n_b(c)`), `taken_M` those already
  drawn; the weights stay `o_b · n_b` while a bucket has batches left, as in `MyRandomMix`.
  """
  batches_M = np.asarray(batches_M, dtype=np.float64)
  open_M = batches_M > (0 if taken_M is None else np.asarray(taken_M))
  weights_M = np.where(open_M, np.asarray(odds_M, dtype=np.float64) * batches_M, 0.0)
  total = weights_M.sum()
  if not total > 0:
    raise ValueError("every bucket is exhausted in this cycle; nothing to draw")
  return weights_M / total


def min_over_processes(sizes_M: np.ndarray) -> np.ndarray:
  """The element-wise minimum of `sizes_M` over all JAX processes (one all-gather).

  Every process must call it at the same point; for `DecomposedBatcher(agree_sizes=...)`.
  """
  gathered_PM = np.asarray(multihost_utils.process_allgather(np.asarray(sizes_M, np.int64)))
  return gathered_PM.reshape(-1, np.size(sizes_M)).min(axis=0)


class CycleSampler:
  """The bucket of every step: `MyRandomMix` over one cycle of batches, repeated; checkpointable.

  Args:
    odds: `[m]` curriculum odds `o_b`, shortest bucket first (`curriculum_odds`).
    sizes: `[m]` pieces per bucket `P_b`.
    rows: `[m]` pieces per batch `r_b`.
    cycles_per_pass: `C`, cycles per pass over the data.
    seed: seeds the draws.

  `next(sampler)` returns `(bucket, batch)`: the bucket drawn and the index of that bucket's batch
  in its endless stream of batches. State: `{"step", "cycle", "taken"}` (batches drawn from each
  bucket in the current cycle).
  """

  def __init__(
    self,
    odds: Sequence[float],
    sizes: Sequence[int],
    rows: Sequence[int],
    *,
    cycles_per_pass: int = 1,
    seed: int = 0,
  ):
    self._odds_M = np.asarray(odds, dtype=np.float64)
    self._sizes = [int(s) for s in sizes]
    self._rows = [int(r) for r in rows]
    if not len(self._odds_M) == len(self._sizes) == len(self._rows):
      raise ValueError("odds, sizes and rows need one entry per bucket")
    if sum(self._sizes) <= 0 or min(self._sizes) < 0 or min(self._rows) < 1:
      raise ValueError(f"need sizes >= 0 with a positive sum and rows >= 1, got {sizes}, {rows}")
    if int(cycles_per_pass) < 1:
      raise ValueError(f"cycles_per_pass must be >= 1, got {cycles_per_pass}")
    self._cycles_per_pass = int(cycles_per_pass)
    self._seed = int(seed)
    self._step = 0
    self._start_cycle(0)

  @property
  def num_buckets(self) -> int:
    return len(self._sizes)

  def batches_before(self, cycle: int) -> list[int]:
    """`floor(c P_b / (C r_b))`: the batches of each bucket drawn in the cycles before `cycle`."""
    return [
      cycle * size // (self._cycles_per_pass * rows)
      for size, rows in zip(self._sizes, self._rows, strict=True)
    ]

  def batches_in(self, cycle: int) -> np.ndarray:
    """`n_b(c)`: `[m]` batches of each bucket in `cycle`."""
    after, before = self.batches_before(cycle + 1), self.batches_before(cycle)
    return np.asarray([a - b for a, b in zip(after, before, strict=True)], dtype=np.int64)

  def _start_cycle(self, cycle: int) -> None:
    # A cycle can be empty when C r_b exceeds every P_b; bucket b then appears every few cycles.
    while not self.batches_in(cycle).any():
      cycle += 1
    self._cycle = cycle
    self._batches_M = self.batches_in(cycle)
    self._taken_M = np.zeros(self.num_buckets, dtype=np.int64)

  def __iter__(self) -> Iterator[tuple[int, int]]:
    return self

  def __next__(self) -> tuple[int, int]:
    probs_M = curriculum_probabilities(self._odds_M, self._batches_M, self._taken_M)
    u = np.random.default_rng([self._seed, 0, self._cycle, int(self._taken_M.sum())]).random()
    bucket = int(np.searchsorted(np.cumsum(probs_M), u, side="right"))
    if bucket >= self.num_buckets:  # u above a rounded-down total: the last open bucket
      bucket = int(np.flatnonzero(probs_M)[-1])
    batch = self.batches_before(self._cycle)[bucket] + int(self._taken_M[bucket])
    self._taken_M[bucket] += 1
    self._step += 1
    if np.array_equal(self._taken_M, self._batches_M):
      self._start_cycle(self._cycle + 1)
    return bucket, batch

  def cursors(self) -> list[int]:
    """Batches drawn so far from each bucket, over all cycles."""
    before = self.batches_before(self._cycle)
    return [b + int(t) for b, t in zip(before, self._taken_M, strict=True)]

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "cycle": self._cycle, "taken": self._taken_M.tolist()}

  def set_state(self, state: dict[str, Any]) -> None:
    taken_M = np.asarray(state["taken"], dtype=np.int64)
    batches_M = self.batches_in(int(state["cycle"]))
    done = taken_M.shape == batches_M.shape and np.array_equal(taken_M, batches_M)
    if taken_M.shape != batches_M.shape or np.any(taken_M > batches_M) or done:
      raise ValueError(
        f"the saved decomposition state (cycle {state['cycle']}, taken {list(taken_M)}) does not "
        f"fit this index ({list(batches_M)} batches in that cycle); restore with the data and "
        "data.decomposition settings it was saved with"
      )
    self._step = int(state["step"])
    self._cycle = int(state["cycle"])
    self._batches_M = batches_M
    self._taken_M = taken_M


class DecomposedBatcher:
  """Yields constant-token batches of single-document power-of-two pieces; checkpointable.

  Args:
    documents: finite random-access documents (`__getitem__`, `__len__`), e.g. a grain
      `MapDataset` holding this process's shard.
    encode: raw document -> int32 tokens without special tokens; `skip_errors` from it (and
      empty documents) skip the document, counted.
    min_log2, max_log2: bucket range; pieces of `2^min_log2 .. 2^max_log2` tokens.
    tokens_per_batch: tokens per batch, a multiple of `2^max_log2`.
    curriculum, curriculum_base: the odds (`curriculum_odds`; module doc).
    cycles_per_pass: cycles per pass over the data (module doc).
    long_split: `random` or `fixed`, how documents longer than `2^(max_log2 + 1)` are cut.
    seed: seeds the bucket of each step, the order of pieces within each bucket and the random
      split.
    shuffle: shuffle the pieces of each bucket at every pass (else document order).
    agree_sizes: called once after indexing with this process's pieces per bucket `[m]`; returns
      the sizes that every process schedules with (`min_over_processes` with several processes).
      None: this process's own.

  Building the index encodes every document once (only the lengths are kept); batches re-encode
  the documents they use, with a small cache. Batches are dicts of `[tokens_per_batch / 2^k, 2^k]`
  arrays with the keys of packed rows; `segment_ids` are all 1 and every target is predicted.
  State: `CycleSampler`'s `{"step", "cycle", "taken"}` plus `"cursors"` (batches taken from each
  bucket, checked on restore) and `"counters"`.
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
    curriculum: str | Sequence[float] = "grow",
    curriculum_base: float = 2.0,
    cycles_per_pass: int = 1,
    long_split: str = "random",
    seed: int = 0,
    shuffle: bool = True,
    position_scheme: str = "global",
    loss_weighting: str = "token",
    skip_errors: tuple[type[BaseException], ...] = (UnicodeError,),
    cache_size: int = 64,
    agree_sizes: Callable[[np.ndarray], np.ndarray] | None = None,
  ):
    if tokens_per_batch % (1 << max_log2) or tokens_per_batch <= 0:
      raise ValueError(
        f"tokens_per_batch {tokens_per_batch} must be a positive multiple of 2^max_log2 = "
        f"{1 << max_log2}; change data.decomposition.tokens_per_batch"
      )
    if long_split not in LONG_SPLITS:
      raise ValueError(
        f"decomposition long_split {long_split!r} is unknown; choose one of "
        f"{', '.join(LONG_SPLITS)}"
      )
    self._log2s = list(range(min_log2, max_log2 + 1))
    odds_M = curriculum_odds(curriculum, len(self._log2s), base=curriculum_base)
    self._documents = documents
    self._encode = encode
    self._bos_id, self._eos_id = bos_id, eos_id
    self._tokens_per_batch = tokens_per_batch
    self._long_split = long_split
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
    self.bucket_sizes = np.asarray([len(pieces) for pieces in self.buckets], dtype=np.int64)
    sizes_M = (
      self.bucket_sizes if agree_sizes is None else np.asarray(agree_sizes(self.bucket_sizes))
    )
    if sizes_M.shape != self.bucket_sizes.shape:
      raise ValueError(f"agree_sizes returned shape {sizes_M.shape}, not {self.bucket_sizes.shape}")
    for k, size in zip(self._log2s, sizes_M, strict=True):
      if size <= 0:  # after agreeing, so every process raises, not only the one lacking pieces
        raise ValueError(
          f"no document of {'this' if agree_sizes is None else 'some process'}'s shard has "
          f"{(1 << k) + 1} tokens for the 2^{k} bucket; lower data.decomposition.max_log2 or "
          "add longer documents"
        )
    self.schedule_sizes = sizes_M.astype(np.int64)
    self.sampler = CycleSampler(
      odds_M,
      self.schedule_sizes,
      [tokens_per_batch >> k for k in self._log2s],
      cycles_per_pass=cycles_per_pass,
      seed=self._seed,
    )
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
    long_pairs = 2 << max_log2  # pairs from which get_binary's draw applies
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
      # A generator only for long documents: building one per document would dominate indexing.
      rng = None
      if self._long_split == "random" and size + 1 >= long_pairs:
        rng = np.random.default_rng([self._seed, 2, index])
      windows = decompose_document(size + 2, min_log2, max_log2, rng)
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

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    bucket, batch = next(self.sampler)
    length = 1 << self._log2s[bucket]
    rows = self._tokens_per_batch // length
    tokens_BL = np.empty((rows, length), dtype=np.int32)
    targets_BL = np.empty((rows, length), dtype=np.int32)
    for r in range(rows):
      doc_index, start = self._piece(bucket, batch * rows + r)
      doc = self._load(doc_index)
      tokens_BL[r] = doc[start : start + length]
      targets_BL[r] = doc[start + 1 : start + length + 1]
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
    return {
      **self.sampler.get_state(),
      "cursors": self.sampler.cursors(),
      "counters": self.counters,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state["cursors"]) != len(self._log2s):
      raise ValueError(
        f"the saved data state has {len(state['cursors'])} decomposition buckets but the config "
        f"has {len(self._log2s)}; restore with the min_log2/max_log2 it was saved with"
      )
    if "cycle" not in state:
      raise ValueError(
        "the saved data state predates the cycle curriculum of data.decomposition; it cannot "
        "be continued exactly, restart the data state"
      )
    self.sampler.set_state(state)
    if self.sampler.cursors() != [int(c) for c in state["cursors"]]:
      raise ValueError(
        f"the saved data state took {list(state['cursors'])} batches per bucket but this index "
        f"gives {self.sampler.cursors()} at that point; the documents or data.decomposition "
        "settings differ from the ones it was saved with"
      )
    self._counters = {key: int(state["counters"][key]) for key in ("tokens", "rows")}
