"""Dataset Decomposition: the split (get_binary), the cycle curriculum (MyRandomMix), batches.

Reference: apple/ml-dataset-decomposition `scripts/make_dd_buckets.py::get_binary`,
`scripts/get_dd_params.py` and `open_lm.patch` (`MyRandomMix`). All numpy, no model.
"""

import json

import numpy as np
import pytest
from packing_fixtures import UNDECODABLE, Undecodable, encode, random_docs

from lcjax.data.decomposition import (
  CycleSampler,
  DecomposedBatcher,
  binary_decomposition,
  curriculum_odds,
  curriculum_probabilities,
  decompose_document,
)
from lcjax.data.packing import frame_document

BOS, EOS = 257, 258


def numbered_docs(seed, count, max_len):
  """Documents whose tokens are all distinct (doc `i`: `1000 * (i + 1) + arange(n)`), so a
  piece is identified by its first target."""
  rng = np.random.default_rng(seed)
  return [
    1000 * (i + 1) + np.arange(rng.integers(1, max_len), dtype=np.int32) for i in range(count)
  ]


def make_batcher(docs, **kwargs):
  defaults = dict(
    bos_id=BOS, eos_id=EOS, min_log2=2, max_log2=6, tokens_per_batch=128, seed=3,
    skip_errors=(Undecodable,),
  )  # fmt: skip
  return DecomposedBatcher(docs, encode, **{**defaults, **kwargs})


def draw_cycles(sampler, cycles):
  """`{cycle: [(bucket, batch), ...]}` for the next `cycles` cycles of `sampler`."""
  out = {}
  while len(out) < cycles or sampler.get_state()["cycle"] in out:
    cycle = sampler.get_state()["cycle"]
    out.setdefault(cycle, []).append(next(sampler))
  return {c: out[c] for c in sorted(out)[:cycles]}


# ----------------------------------------------------------------------------------------------
# The split


def test_binary_decomposition_fixed_split():
  assert binary_decomposition(13, 0, 10) == [8, 4, 1]
  assert binary_decomposition(13, 1, 10) == [8, 4]
  assert binary_decomposition(13, 0, 2) == [4, 4, 4, 1]
  assert binary_decomposition(3, 2, 5) == []
  rng = np.random.default_rng(0)
  for length in rng.integers(0, 5000, 200):
    pieces = binary_decomposition(int(length), 3, 9)
    assert all(8 <= p <= 512 and p & (p - 1) == 0 for p in pieces)
    assert pieces == sorted(pieces, reverse=True)
    assert 0 <= length - sum(pieces) < 8
  windows = decompose_document(14, 0, 10)  # 13 next-token pairs
  assert windows == [(0, 8), (8, 4), (12, 1)]


def test_random_split_keeps_short_documents_and_loses_only_low_bits():
  rng = np.random.default_rng(1)
  for length in rng.integers(0, 20000, 100):
    pieces = binary_decomposition(int(length), 3, 9, np.random.default_rng(int(length)))
    assert all(8 <= p <= 512 and p & (p - 1) == 0 for p in pieces)
    assert 0 <= length - sum(pieces) < 8
    if length < 1024:  # below 2^(max + 1): get_binary takes the binary digits
      assert pieces == binary_decomposition(int(length), 3, 9)
  windows = decompose_document(5000, 3, 9, np.random.default_rng(0))
  assert [s for s, _ in windows] == np.cumsum([0] + [n for _, n in windows[:-1]]).tolist()


def test_random_split_piece_lengths_follow_get_binary():
  """A long document's pieces have `p(k) ∝ 2^(max - k)` (get_binary's `ps`), within sampling
  error: chi-square over the 5 lengths, about 6400 draws."""
  min_log2, max_log2 = 2, 6
  pieces = binary_decomposition(1 << 16, min_log2, max_log2, np.random.default_rng(0))
  ks = np.log2(pieces).astype(int)
  counts = np.bincount(ks, minlength=max_log2 + 1)[min_log2:]
  probs = 2.0 ** (max_log2 - np.arange(min_log2, max_log2 + 1))
  probs /= probs.sum()  # 16:8:4:2:1 over 4..64 tokens
  expected = probs * counts.sum()
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert counts.sum() > 6000 and chi2 < 18.5, (counts, expected)  # 4 dof, p = 0.001
  # Equal expected tokens per bucket: each bucket holds about a fifth of the document.
  tokens = counts * (1 << np.arange(min_log2, max_log2 + 1))
  np.testing.assert_allclose(tokens / tokens.sum(), 0.2, atol=0.03)
  # The fixed split cuts the same document into 2^max pieces only.
  assert set(binary_decomposition(1 << 16, min_log2, max_log2)) == {64}


def test_random_split_is_deterministic_given_the_seed():
  docs = [b"x" * 700, b"y" * 40, b"z" * 1500]
  a, b, c = make_batcher(docs), make_batcher(docs), make_batcher(docs, seed=4)
  for x, y in zip(a.buckets, b.buckets, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a.buckets, c.buckets, strict=True))
  fixed = make_batcher(docs, long_split="fixed")
  assert [len(p) for p in fixed.buckets] != [len(p) for p in a.buckets]
  assert len(fixed.buckets[-1]) == 701 // 64 + 1501 // 64  # 2^max pieces of the long documents


# ----------------------------------------------------------------------------------------------
# The curriculum


def test_curriculum_odds():
  np.testing.assert_allclose(curriculum_odds("grow", 6), [32, 16, 8, 4, 2, 1])  # Grow-P2
  np.testing.assert_allclose(curriculum_odds("shrink", 3, base=100), [1, 100, 1e4])
  np.testing.assert_allclose(curriculum_odds("uniform", 3), [1, 1, 1])
  np.testing.assert_allclose(curriculum_odds([6, 5, 4], 3), [6, 5, 4])
  with pytest.raises(ValueError, match="curriculum 'linear' is unknown"):
    curriculum_odds("linear", 3)
  with pytest.raises(ValueError, match="must be 3 positive numbers"):
    curriculum_odds([1, 2], 3)
  # get_dd_params' README example: its sampling weights are odds x batches per cycle.
  batches = np.array([1507328 * 256, 1277952 * 512, 794624 * 1024, 335872 * 2048, 137216 * 4096,
                      61440 * 8192]) // (64 * 8192)  # fmt: skip
  want = np.array([1472, 1248, 776, 328, 134, 60], dtype=float)  # --train-data-mix-weights
  np.testing.assert_allclose(
    curriculum_probabilities(curriculum_odds("grow", 6), batches), want / want.sum(), rtol=0.01
  )


@pytest.mark.parametrize("curriculum", ["grow", "uniform", [1.0, 5.0, 2.0]])
def test_bucket_frequencies_follow_odds_times_batches(curriculum):
  """Before any bucket runs out, draws are i.i.d. with p ∝ o_b n_b (MyRandomMix's fixed probs),
  not ∝ o_b and not 1/m: here the long bucket has 12x the batches of the short one."""
  batches = np.array([3000, 9000, 36000])
  sampler = CycleSampler(curriculum_odds(curriculum, 3), batches, [1, 1, 1], seed=5)
  draws = np.array([next(sampler)[0] for _ in range(3000)])
  freq = np.bincount(draws, minlength=3) / draws.size
  want = curriculum_odds(curriculum, 3) * batches
  want = want / want.sum()
  assert sampler.get_state()["cycle"] == 0 and all(np.bincount(draws) < batches)
  sigma = np.sqrt(want * (1 - want) / draws.size)
  assert np.all(np.abs(freq - want) < 4 * sigma), (freq, want)


@pytest.mark.parametrize("cycles_per_pass", [1, 3])
def test_each_cycle_uses_each_batch_once_and_never_an_exhausted_bucket(cycles_per_pass):
  sizes, rows = [50, 203, 95, 9], [8, 4, 2, 1]  # pieces, pieces per batch
  sampler = CycleSampler([8, 4, 2, 1], sizes, rows, cycles_per_pass=cycles_per_pass, seed=0)
  seen = {b: [] for b in range(4)}
  for cycle, draws in draw_cycles(sampler, 2 * cycles_per_pass).items():
    batches = sampler.batches_in(cycle)
    before = sampler.batches_before(cycle)
    for b in range(4):
      got = sorted(j for bucket, j in draws if bucket == b)
      assert got == list(range(before[b], before[b] + batches[b])), "each batch once"
      seen[b] += got
    # An exhausted bucket is never drawn: each bucket's last draw ends its share of the cycle.
    counts = np.zeros(4, int)
    for bucket, _ in draws:
      assert counts[bucket] < batches[bucket]
      counts[bucket] += 1
    np.testing.assert_array_equal(counts, batches)
  # C cycles make one pass (two passes here): every batch of every bucket, once per pass.
  for b in range(4):
    assert seen[b] == list(range(2 * sizes[b] // rows[b])), b


def test_grow_runs_out_of_short_sequences_first_within_each_cycle():
  # 100 batches per bucket and cycle, so only the odds 8:4:2:1 order them.
  sampler = CycleSampler(curriculum_odds("grow", 4), [800, 400, 200, 100], [8, 4, 2, 1], seed=1)
  for draws in draw_cycles(sampler, 3).values():
    buckets = np.array([b for b, _ in draws])
    last = [np.flatnonzero(buckets == b).max() for b in range(4)]
    assert last == sorted(last), "short buckets finish first"
    half = buckets.size // 2
    assert buckets[:half].mean() < buckets[half:].mean()


def test_cycle_sampler_resumes_exactly_mid_cycle():
  make = lambda: CycleSampler([4, 2, 1], [60, 90, 30], [4, 2, 1], seed=7)  # noqa: E731
  full = make()
  want = [next(full) for _ in range(200)]
  for k in (7, 41, 95, 151):
    sampler = make()
    for _ in range(k):
      next(sampler)
    state = json.loads(json.dumps(sampler.get_state()))
    fresh = make()
    fresh.set_state(state)
    assert [next(fresh) for _ in range(200 - k)] == want[k:]
  with pytest.raises(ValueError, match="does not fit this index"):
    CycleSampler([4, 2, 1], [6, 9, 3], [4, 2, 1]).set_state(state)


# ----------------------------------------------------------------------------------------------
# Batches


def test_decomposition_pieces_are_powers_of_two_from_one_document():
  docs = random_docs(2, 60, 400)
  docs[5] = b""
  docs[9] = UNDECODABLE
  framed = [frame_document(encode(d), BOS, EOS) if d and d != UNDECODABLE else None for d in docs]
  batcher = make_batcher(docs)
  assert batcher.index_stats["skipped_empty"] == 1
  assert batcher.index_stats["skipped_undecodable"] == 1
  windows = {}
  for _ in range(60):
    batch = next(batcher)
    rows, length = batch["tokens"].shape
    assert length & (length - 1) == 0 and 4 <= length <= 64 and rows * length == 128
    np.testing.assert_array_equal(batch["segment_ids"], 1)
    np.testing.assert_array_equal(batch["loss_weights"], 1.0)
    np.testing.assert_array_equal(
      batch["positions"], np.broadcast_to(np.arange(length), (rows, length))
    )
    if length not in windows:  # every (length + 1)-slice of every document, by content
      windows[length] = {}
      for i, f in enumerate(framed):
        if f is not None and f.size > length:
          for w in np.lib.stride_tricks.sliding_window_view(f, length + 1):
            windows[length].setdefault(w.tobytes(), []).append(i)
    for tokens, targets in zip(batch["tokens"], batch["targets"], strict=True):
      np.testing.assert_array_equal(targets[:-1], tokens[1:])
      hits = windows[length].get(np.concatenate([tokens, targets[-1:]]).tobytes(), [])
      assert len(hits) == 1, "each piece is a contiguous slice of exactly one document"


@pytest.mark.parametrize("long_split", ["random", "fixed"])
def test_batcher_cycle_takes_every_piece_once(long_split):
  docs = numbered_docs(0, 50, 600)
  batcher = make_batcher(docs, long_split=long_split)
  rows = [128 >> k for k in range(2, 7)]
  sizes = batcher.bucket_sizes.tolist()
  cycle_rows = {}
  while batcher.get_state()["cycle"] == 0:
    batch = next(batcher)
    cycle_rows.setdefault(batch["tokens"].shape[1], []).extend(batch["targets"][:, 0].tolist())
  for k, (size, r) in enumerate(zip(sizes, rows, strict=True)):
    firsts = cycle_rows.get(1 << (k + 2), [])
    assert len(firsts) == len(set(firsts)) == size // r * r, (k, size, r)
    # They are exactly the bucket's pieces (identified by their first target).
    all_firsts = {int(docs[d][s]) for d, s in batcher.buckets[k]}
    assert set(firsts) <= all_firsts and len(all_firsts) == size


def test_grow_moves_from_short_to_long_pieces():
  batcher = make_batcher(random_docs(2, 60, 400))
  lengths = []
  while batcher.get_state()["cycle"] == 0:
    lengths.append(next(batcher)["tokens"].shape[1])
  quarter = len(lengths) // 4
  assert np.mean(lengths[:quarter]) < np.mean(lengths[-quarter:])


def test_decomposition_state_restores_mid_cycle():
  docs = random_docs(4, 40, 300)
  full = make_batcher(docs, cycles_per_pass=2)
  batches = [next(full) for _ in range(80)]
  assert full.get_state()["cycle"] >= 2, "the run crosses cycle boundaries"
  for k in (5, 33, 61):
    batcher = make_batcher(docs, cycles_per_pass=2)
    for _ in range(k):
      next(batcher)
    state = json.loads(json.dumps(batcher.get_state()))
    cycle = state["cycle"]
    assert 0 < sum(state["taken"]) < sum(batcher.sampler.batches_in(cycle)), "mid-cycle"
    fresh = make_batcher(docs, cycles_per_pass=2)
    fresh.set_state(state)
    for want in batches[k:]:
      got = next(fresh)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert fresh.counters == full.counters
  with pytest.raises(ValueError, match="differ from the ones it was saved with"):
    make_batcher(random_docs(5, 40, 300), cycles_per_pass=2).set_state(state)
  with pytest.raises(ValueError, match="predates the cycle curriculum"):
    make_batcher(docs).set_state({"step": 3, "cursors": [0] * 5, "counters": {}})


def test_processes_with_agreed_sizes_draw_the_same_buckets():
  """Two shards of one corpus, as two processes: with the sizes agreed (the minimum, as
  `min_over_processes` gives), every step draws the same bucket on both."""
  docs = random_docs(6, 80, 400)
  shards = [docs[0::2], docs[1::2]]
  local = [make_batcher(s).bucket_sizes for s in shards]
  assert not np.array_equal(*local)
  agreed = np.minimum(*local)
  batchers = [make_batcher(s, agree_sizes=lambda _: agreed) for s in shards]
  shapes = [[next(b)["tokens"].shape for _ in range(150)] for b in batchers]
  assert shapes[0] == shapes[1] and len(set(shapes[0])) > 1
  np.testing.assert_array_equal(batchers[0].schedule_sizes, agreed)


def test_decomposition_rejects_bad_settings():
  docs = random_docs(5, 10, 50)
  with pytest.raises(ValueError, match="multiple of 2\\^max_log2"):
    make_batcher(docs, tokens_per_batch=100)
  with pytest.raises(ValueError, match="lower data.decomposition.max_log2"):
    make_batcher(docs, max_log2=8, tokens_per_batch=256)
  with pytest.raises(ValueError, match="some process's shard"):
    make_batcher(docs, agree_sizes=lambda sizes: sizes * 0)
  with pytest.raises(ValueError, match="long_split 'middle' is unknown"):
    make_batcher(docs, long_split="middle")
  with pytest.raises(ValueError, match="must be 5 positive numbers"):
    make_batcher(docs, curriculum=[1, 2, 3])
