"""Packing invariants (segments, targets, positions, loss weights) and Dataset Decomposition."""

import numpy as np
import pytest

from lcjax.attention.masks import MaskSpec
from lcjax.data.decomposition import (
  DecomposedBatcher,
  binary_decomposition,
  curriculum_probabilities,
  decompose_document,
)
from lcjax.data.packing import DocumentPacker, frame_document, make_positions_np, row_loss_weights
from lcjax.positional.positions import make_positions

PAD, BOS, EOS = 256, 257, 258
UNDECODABLE = b"\xff<undecodable>"


class Undecodable(ValueError):
  pass


def encode(doc):
  if doc == UNDECODABLE:
    raise Undecodable("not utf-8")
  return np.frombuffer(doc, dtype=np.uint8).astype(np.int32)


def random_docs(seed, count, max_len):
  rng = np.random.default_rng(seed)
  return [
    bytes(rng.integers(0, 256, rng.integers(1, max_len)).astype(np.uint8)) for _ in range(count)
  ]


def make_packer(docs, seq_len, **kwargs):
  return DocumentPacker(
    docs, encode, seq_len=seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD,
    skip_errors=(Undecodable,), **kwargs,
  )  # fmt: skip


def pack_all(docs, seq_len, **kwargs):
  packer = make_packer(docs, seq_len, **kwargs)
  return list(packer), packer


def ground_truth(docs):
  """Framed tokens of the packable documents, flat, with each token's document index."""
  framed = [frame_document(encode(d), BOS, EOS) for d in docs if d != UNDECODABLE and d]
  doc_ids = np.concatenate([np.full(f.size, i) for i, f in enumerate(framed)])
  return np.concatenate(framed), doc_ids


@pytest.fixture(scope="module")
def mixed_docs():
  docs = random_docs(0, 40, 200)
  docs[3] = b""
  docs[7] = UNDECODABLE
  docs[11] = b""
  docs[20] = bytes(range(256)) * 3  # 770 framed tokens: split over several 64-token rows
  return docs


def test_segments_never_cross_documents(mixed_docs):
  rows, _ = pack_all(mixed_docs, 64)
  flat, doc_ids = ground_truth(mixed_docs)
  cursor = 0
  for row in rows:
    seg = row["segment_ids"]
    real = seg > 0
    n = int(real.sum())
    assert np.all(real[:n]) and not np.any(real[n:]), "padding only at the row end"
    np.testing.assert_array_equal(row["tokens"][:n], flat[cursor : cursor + n])
    ids = doc_ids[cursor : cursor + n]
    cursor += n
    # Same segment <=> same document, and segment ids count up from 1 per piece.
    same_seg = seg[:n, None] == seg[None, :n]
    same_doc = ids[:, None] == ids[None, :]
    np.testing.assert_array_equal(same_seg, same_doc)
    np.testing.assert_array_equal(np.unique(seg[:n]), np.arange(1, len(np.unique(ids)) + 1))
    # Under the document mask the model builds from these ids, no query sees another document.
    t = np.arange(64)[None]
    allowed = np.asarray(MaskSpec(causal=True, document=True).dense(t, t, seg[None], seg[None]))[0]
    assert not np.any(allowed[:n, :n] & ~same_doc)
  assert cursor == flat.size, "every token of every packable document is emitted once"


def test_targets_and_loss_weights(mixed_docs):
  rows, _ = pack_all(mixed_docs, 64)
  flat, doc_ids = ground_truth(mixed_docs)
  cursor = 0
  for row in rows:
    n = int((row["segment_ids"] > 0).sum())
    w = row["loss_weights"]
    assert w.dtype == np.float32 and np.all(w[n:] == 0)
    for i in range(n):
      g = cursor + i
      continues = g + 1 < flat.size and doc_ids[g + 1] == doc_ids[g]
      if continues:  # Includes the row's last token when its document goes on in the next row.
        assert w[i] == 1 and row["targets"][i] == flat[g + 1]
      else:  # A document's eos: its target would be the next document's bos.
        assert w[i] == 0 and row["tokens"][i] == EOS and row["targets"][i] == PAD
    cursor += n


def test_long_document_split_into_segments(mixed_docs):
  rows, _ = pack_all(mixed_docs, 64)
  flat, doc_ids = ground_truth(mixed_docs)
  long_doc = frame_document(encode(mixed_docs[20]), BOS, EOS)
  long_id = 20 - 3  # Three documents before it are skipped.
  pieces, cursor = [], 0
  for row in rows:
    n = int((row["segment_ids"] > 0).sum())
    here = doc_ids[cursor : cursor + n] == long_id
    cursor += n
    if not here.any():
      continue
    assert len(np.unique(row["segment_ids"][:n][here])) == 1, "one segment per row"
    pieces.append(row["tokens"][:n][here])
    if not here[-1] or n < 64:
      continue
    # The piece ends the row and the document goes on: its last target is the next token.
    assert row["loss_weights"][63] == 1 and row["targets"][63] == long_doc[sum(map(len, pieces))]
  assert len(pieces) > long_doc.size // 64
  np.testing.assert_array_equal(np.concatenate(pieces), long_doc)


@pytest.mark.parametrize("scheme", ["global", "per_document", "anchor"])
def test_positions_match_make_positions(mixed_docs, scheme):
  rows, _ = pack_all(mixed_docs, 64, position_scheme=scheme)
  seg_BT = np.stack([r["segment_ids"] for r in rows])
  pos_BT = np.stack([r["positions"] for r in rows])
  assert pos_BT.dtype == np.int32
  np.testing.assert_array_equal(pos_BT, np.asarray(make_positions(seg_BT, scheme)))
  if scheme == "per_document":
    starts = np.concatenate([np.ones((len(rows), 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], 1)
    assert np.all(pos_BT[starts] == 0) and np.all(pos_BT[~starts] > 0)
  else:
    np.testing.assert_array_equal(pos_BT, np.broadcast_to(np.arange(64), pos_BT.shape))


def test_document_loss_weighting_lwm(mixed_docs):
  token_rows, _ = pack_all(mixed_docs, 64, loss_weighting="token")
  doc_rows, _ = pack_all(mixed_docs, 64, loss_weighting="document")
  rng = np.random.default_rng(1)
  for token_row, doc_row in zip(token_rows, doc_rows, strict=True):
    seg, mask, w = doc_row["segment_ids"], token_row["loss_weights"], doc_row["loss_weights"]
    np.testing.assert_array_equal(w > 0, mask > 0)
    np.testing.assert_allclose(w[mask > 0].mean(), 1.0, rtol=1e-6)
    pieces = [s for s in np.unique(seg[seg > 0]) if mask[seg == s].sum() > 0]
    sums = [w[seg == s].sum() for s in pieces]
    np.testing.assert_allclose(sums, sums[0], rtol=1e-5)  # every document weighs the same
    # The weighted loss is the mean over documents of each document's mean loss.
    nll = rng.random(64)
    per_doc = np.mean([nll[(seg == s) & (mask > 0)].mean() for s in pieces])
    np.testing.assert_allclose((w * nll).sum() / w.sum(), per_doc, rtol=1e-5)
  assert any(len(np.unique(r["segment_ids"])) > 2 for r in doc_rows)


def test_row_loss_weights_by_hand():
  seg = np.array([1, 1, 1, 1, 2, 2, 0, 0])
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 0])
  # N = 4 loss tokens, S = 2 documents: doc 1 (3 tokens) 4/(2*3), doc 2 (1 token) 4/(2*1).
  expected = [2 / 3, 2 / 3, 2 / 3, 0, 2, 0, 0, 0]
  np.testing.assert_allclose(row_loss_weights(seg, mask, "document"), expected, rtol=1e-6)
  np.testing.assert_array_equal(row_loss_weights(seg, mask, "token"), mask)
  with pytest.raises(ValueError, match="loss_weighting"):
    row_loss_weights(seg, mask, "sequence")


def test_empty_and_undecodable_skipped_and_counted(mixed_docs):
  rows, packer = pack_all(mixed_docs, 64)
  counters = packer.counters
  assert counters["skipped_empty"] == 2 and counters["skipped_undecodable"] == 1
  assert counters["documents"] == len(mixed_docs) - 3
  assert counters["rows"] == len(rows)
  assert counters["tokens"] == sum(int((r["segment_ids"] > 0).sum()) for r in rows)


def test_all_empty_corpus_raises():
  packer = make_packer([b"", UNDECODABLE] * 100, 8, epoch_size=2)
  with pytest.raises(ValueError, match="empty or undecodable"):
    next(packer)


def test_packer_state_restores_mid_document(mixed_docs):
  rows, full = pack_all(mixed_docs, 48)
  offsets = []
  for k in (1, 5, 9):
    packer = make_packer(mixed_docs, 48)
    for _ in range(k):
      next(packer)
    offsets.append(packer.get_state()["offset"])
    fresh = make_packer(mixed_docs, 48)
    fresh.set_state(packer.get_state())
    for expected in rows[k:]:
      got = next(fresh)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert fresh.counters == full.counters
  assert any(offsets), "at least one restore happens in the middle of a document"


def test_make_positions_np_rejects_unknown_scheme():
  with pytest.raises(ValueError, match="position scheme 'rope'"):
    make_positions_np(np.ones((1, 4), np.int32), "rope")


# ----------------------------------------------------------------------------------------------
# Dataset Decomposition


def test_binary_decomposition():
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


def test_curriculum_probabilities():
  grow0 = curriculum_probabilities("grow", 0, 6, base=2.0, steps=100)
  np.testing.assert_allclose(grow0, np.array([32, 16, 8, 4, 2, 1]) / 63)
  np.testing.assert_allclose(curriculum_probabilities("grow", 50, 6, steps=100), np.full(6, 1 / 6))
  np.testing.assert_allclose(curriculum_probabilities("grow", 500, 6, steps=100), grow0[::-1])
  np.testing.assert_allclose(curriculum_probabilities("shrink", 0, 6, steps=100), grow0[::-1])
  np.testing.assert_allclose(curriculum_probabilities("uniform", 7, 3), np.full(3, 1 / 3))
  with pytest.raises(ValueError, match="curriculum 'linear'"):
    curriculum_probabilities("linear", 0, 3)


def make_batcher(docs, **kwargs):
  defaults = dict(
    bos_id=BOS,
    eos_id=EOS,
    min_log2=2,
    max_log2=6,
    tokens_per_batch=128,
    curriculum_steps=40,
    seed=3,
    skip_errors=(Undecodable,),
  )
  return DecomposedBatcher(docs, encode, **{**defaults, **kwargs})


def test_decomposition_pieces_are_powers_of_two_from_one_document():
  docs = random_docs(2, 60, 400)
  docs[5] = b""
  docs[9] = UNDECODABLE
  framed = [frame_document(encode(d), BOS, EOS) if d and d != UNDECODABLE else None for d in docs]
  batcher = make_batcher(docs)
  assert batcher.index_stats["skipped_empty"] == 1
  assert batcher.index_stats["skipped_undecodable"] == 1
  lengths, windows = [], {}
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
    lengths.append(length)
  # The grow curriculum moves from short to long pieces.
  assert np.mean(lengths[:15]) < np.mean(lengths[-15:])


def test_decomposition_state_restores():
  docs = random_docs(4, 40, 300)
  expected = [next(make_batcher(docs)) for _ in range(1)]
  batcher = make_batcher(docs)
  batches = [next(batcher) for _ in range(30)]
  assert expected[0]["tokens"].shape == batches[0]["tokens"].shape
  batcher = make_batcher(docs)
  for _ in range(12):
    next(batcher)
  fresh = make_batcher(docs)
  fresh.set_state(batcher.get_state())
  for want in batches[12:]:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_decomposition_rejects_bad_settings():
  docs = random_docs(5, 10, 50)
  with pytest.raises(ValueError, match="multiple of 2\\^max_log2"):
    make_batcher(docs, tokens_per_batch=100)
  with pytest.raises(ValueError, match="lower data.decomposition.max_log2"):
    make_batcher(docs, max_log2=8, tokens_per_batch=256)
