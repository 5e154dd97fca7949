"""Packing invariants (segments, targets, positions, loss weights); DD: test_decomposition.py."""

import numpy as np
import pytest
from packing_fixtures import UNDECODABLE, Undecodable, encode, random_docs

from lcjax.attention.masks import MaskSpec
from lcjax.data.packing import DocumentPacker, frame_document, make_positions_np, row_loss_weights
from lcjax.positional.positions import make_positions

PAD, BOS, EOS = 256, 257, 258


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
    pieces = [s for s in np.unique(seg[seg > 0]) if mask[seg == s].sum() > 0]
    # Every piece weighs 1, spread evenly over its loss tokens, whatever its length.
    np.testing.assert_allclose([w[seg == s].sum() for s in pieces], 1.0, rtol=1e-5)
    for s in pieces:
      np.testing.assert_allclose(w[(seg == s) & (mask > 0)], 1 / mask[seg == s].sum(), rtol=1e-6)
    # The weighted loss is the mean over documents of each document's mean loss.
    nll = rng.random(64)
    per_doc = np.mean([nll[(seg == s) & (mask > 0)].mean() for s in pieces])
    np.testing.assert_allclose((w * nll).sum() / w.sum(), per_doc, rtol=1e-5)
  assert any(len(np.unique(r["segment_ids"])) > 2 for r in doc_rows)


def test_row_loss_weights_by_hand():
  seg = np.array([1, 1, 1, 1, 2, 2, 0, 0])
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 0])
  # Each piece sums to 1: doc 1 has 3 loss tokens (1/3 each), doc 2 one (1).
  expected = [1 / 3, 1 / 3, 1 / 3, 0, 1, 0, 0, 0]
  np.testing.assert_allclose(row_loss_weights(seg, mask, "document"), expected, rtol=1e-6)
  np.testing.assert_array_equal(row_loss_weights(seg, mask, "token"), mask)
  with pytest.raises(ValueError, match="loss_weighting"):
    row_loss_weights(seg, mask, "sequence")


def issue_example_rows():
  """Issue #14's example: row A holds one document with 7 loss tokens, row B four documents
  with 1 loss token each (then padding). Returns segment_ids_BT, loss_mask_BT, document_BT (a
  batch-wide document index, -1 where nothing is predicted)."""
  seg_BT = np.array([[1] * 7 + [0], [1, 2, 3, 4, 0, 0, 0, 0]], np.int32)
  mask_BT = (seg_BT > 0).astype(np.float32)
  doc_BT = np.where(seg_BT > 0, seg_BT - 1 + np.array([[0], [1]]), -1)
  return seg_BT, mask_BT, doc_BT


def test_document_weighting_is_one_per_document_across_rows():
  """LWM: every document weighs 1/5 of the batch loss, not 7/11 and 1/11 (weights equalized
  within each row, then normalized over the batch)."""
  seg_BT, mask_BT, doc_BT = issue_example_rows()
  w_BT = np.stack(
    [row_loss_weights(s, m, "document") for s, m in zip(seg_BT, mask_BT, strict=True)]
  )
  share = [w_BT[doc_BT == d].sum() / w_BT.sum() for d in range(5)]
  np.testing.assert_allclose(share, 0.2, rtol=1e-6)
  # sum(w * nll) / sum(w), the train step's loss, is the mean over documents of their means.
  nll_BT = np.random.default_rng(0).random(seg_BT.shape)
  per_doc = np.mean([nll_BT[doc_BT == d].mean() for d in range(5)])
  np.testing.assert_allclose((w_BT * nll_BT).sum() / w_BT.sum(), per_doc, rtol=1e-6)


def anchor_oracle(docs, seq_len):
  """What the AnchorAttention rows must be, built independently of the packer.

  Documents are framed without BOS (`tokens + [eos]`) and concatenated; every row is the BOS
  anchor followed by the next `seq_len - 1` stream tokens (AnchorContext `train.py`:
  `add_anchor_token_to_inputs`). Returns, per row, (tokens, targets, segment_ids, loss_weights,
  document index per slot: -1 for the anchor and padding).
  """
  framed = [np.append(encode(d), EOS) for d in docs if d != UNDECODABLE and d]
  stream = np.concatenate(framed)
  doc_of = np.concatenate([np.full(f.size, i) for i, f in enumerate(framed)])
  starts = np.concatenate([[True], doc_of[1:] != doc_of[:-1]])
  rows, g = [], 0
  while g < stream.size:
    idx = np.arange(g, min(g + seq_len - 1, stream.size))
    n = idx.size
    tokens = np.full(seq_len, PAD)
    targets = np.full(seq_len, PAD)
    seg = np.zeros(seq_len, int)
    weights = np.zeros(seq_len)
    docs_in_row = np.full(seq_len, -1)
    tokens[0], tokens[1 : n + 1] = BOS, stream[idx]
    # The anchor predicts the row's first token; it counts when that token starts a document.
    targets[0], weights[0], seg[0] = stream[g], float(starts[g]), 1
    seg[1 : n + 1] = 1 + np.cumsum(np.concatenate([[0], doc_of[idx[1:]] != doc_of[idx[:-1]]]))
    docs_in_row[1 : n + 1] = doc_of[idx]
    for j, gi in enumerate(idx, start=1):
      if gi + 1 < stream.size and doc_of[gi + 1] == doc_of[gi]:
        targets[j], weights[j] = stream[gi + 1], 1.0
    rows.append((tokens, targets, seg, weights, docs_in_row))
    g += n
  return rows


def anchor_docs():
  docs = random_docs(6, 12, 40)
  docs[2] = bytes(range(100))  # 101 framed tokens: several continuation rows of 32
  docs[5] = b""
  docs[8] = bytes(range(200, 256)) * 2  # 113 framed tokens
  docs[9] = b"z"  # one token and eos
  return docs


def test_anchor_rows_start_with_one_shared_bos():
  """AnchorAttention: every row, continuation rows included, starts with the one BOS anchor;
  documents carry no BOS of their own; positions are global; the anchor predicts the row's first
  token (weight 1 only when a document starts there); the mask shows key 0 to every document."""
  docs = anchor_docs()
  T = 32
  rows, _ = pack_all(docs, T, position_scheme="anchor")
  doc_rows, _ = pack_all(docs, T, position_scheme="anchor", loss_weighting="document")
  want = anchor_oracle(docs, T)
  assert len(rows) == len(want) and len(rows) > 10
  continuation_rows = 0
  spec = MaskSpec(causal=True, document=True, anchor=True)
  t_1T = np.arange(T)[None]
  for row, doc_row, expected in zip(rows, doc_rows, want, strict=True):
    tokens, targets, seg, weights, doc_of = expected
    assert row["tokens"][0] == BOS and not np.any(row["tokens"][1:] == BOS)
    np.testing.assert_array_equal(row["tokens"], tokens)
    np.testing.assert_array_equal(row["targets"], targets)
    np.testing.assert_array_equal(row["segment_ids"], seg)
    np.testing.assert_array_equal(row["loss_weights"], weights)
    np.testing.assert_array_equal(row["positions"], np.arange(T))
    assert not np.any((row["targets"] == BOS) & (row["loss_weights"] > 0)), "BOS is no target"
    continuation_rows += row["loss_weights"][0] == 0
    # Document weighting: the anchor's prediction belongs to the first piece; each piece sums to 1.
    w = doc_row["loss_weights"]
    for s in np.unique(seg[weights > 0]):
      np.testing.assert_allclose(w[seg == s].sum(), 1.0, rtol=1e-5)
    # The model's mask (model.anchor=True): every query sees the anchor and its own document.
    allowed_TT = np.asarray(spec.dense(t_1T, t_1T, seg[None], seg[None]))[0]
    assert np.all(allowed_TT[:, 0]), "key 0 is visible to every query"
    assert not np.any(allowed_TT[0, 1:]), "the anchor sees only itself"
    # Between document tokens (index 1 on, not padding): causal within the same document only.
    real = np.flatnonzero(doc_of >= 0)
    same_doc = (doc_of[real, None] == doc_of[None, real]) & (real[:, None] >= real[None, :])
    np.testing.assert_array_equal(allowed_TT[np.ix_(real, real)], same_doc)
  assert continuation_rows >= 4, "rows that continue a document also start with the anchor"


def test_anchor_is_the_only_key_documents_share_in_the_model():
  """Model-level AnchorAttention on a packed anchor row: changing one document leaves the others'
  logits unchanged; changing the anchor changes every document's."""
  from flax import nnx

  from lcjax.models import build_model, llama_config

  T = 32
  docs = [b"abcdefghij", b"klmnop", b"qrstuvwxyz0123456789"]
  row = next(make_packer(docs, T, position_scheme="anchor"))
  seg_T = row["segment_ids"]
  assert seg_T.max() == 3
  cfg = llama_config(anchor=True, dtype="float32", num_layers=1, d_model=64, mlp_dim=128)
  model = build_model(cfg, rngs=nnx.Rngs(0))

  other_doc = row["tokens"].copy()
  other_doc[seg_T == 2] = (other_doc[seg_T == 2] + 1) % 256
  other_anchor = row["tokens"].copy()
  other_anchor[0] = EOS
  tokens_BT = np.stack([row["tokens"], other_doc, other_anchor])
  logits_BTV = np.asarray(
    model(
      tokens_BT, positions=np.tile(row["positions"], (3, 1)), segment_ids=np.tile(seg_T, (3, 1))
    )
  )
  changed_BT = np.abs(logits_BTV[1:] - logits_BTV[:1]).max(-1) > 1e-5
  np.testing.assert_array_equal(changed_BT[0], seg_T == 2)  # one document changed: only it moves
  assert np.all(changed_BT[1][seg_T > 0]), "every document sees the anchor"


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
