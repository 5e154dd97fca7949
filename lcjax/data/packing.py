"""Packing token documents into fixed-length rows with document segments (pure numpy).

Policy: greedy sequential concatenation ("concat-and-chunk", the baseline that Pouransari et al.
2024, "Dataset Decomposition", arXiv:2405.13226, compare against) that keeps document boundaries
as segments. Each document becomes `[bos] + tokens + [eos]`; documents are appended to the row in
stream order until the row is full, then the row is emitted. A document that does not fit is
split: its head ends the row and its tail starts the next row as a new segment, so documents
longer than a row become several pieces, each its own segment. Padding (segment id 0) only
appears at the end of the last row of a finite stream.

With `position_scheme="anchor"` (AnchorAttention, Wang et al. 2024, "When Precision Meets
Position: BFloat16 Breaks Down RoPE in Long-Context Training", arXiv:2411.13476) every row, a
continuation row included, starts with one shared anchor, the `bos` token, and documents are
framed as `tokens + [eos]` without their own `bos`, as the reference's FlexAttention path does
(haonan3/AnchorContext `train.py` at 3af89f2: `process_tokenized_data` strips each document's
leading BOS, line 146; `add_anchor_token_to_inputs`, lines 256-275, prepends one anchor per row
and asserts there is no other). The anchor is key 0, which `MaskSpec(document=True,
anchor=True)` (`model.anchor=True`) shows to every document; see `DocumentPacker` for its
segment id, position, target and loss weight.

Every row is a dict of `[T]` arrays (`ROW_KEYS`):

- `tokens` int32: the inputs.
- `targets` int32: the next token of the same document. At the row's last position this is the
  document's next token in the following row, so no prediction is lost at a split. Where the
  next token belongs to another document (after each document's `eos`) or there is none
  (padding), the target is `pad_id` and the loss weight is 0.
- `segment_ids` int32: 1, 2, 3, ... for the document pieces of the row, 0 for padding. With a
  document mask (`MaskSpec(document=True)`) no query attends across documents.
- `positions` int32: from `make_positions_np` (the numpy twin of
  `lcjax.positional.positions.make_positions`, same semantics).
- `loss_weights` float32: 0 on padding and on each document's `eos` (the last token of a
  document, whose target would be the next document's first token); otherwise 1 with
  `loss_weighting="token"`, or the LWM weighting with `"document"` (see `row_loss_weights`).

Empty documents and documents the tokenizer cannot decode are skipped and counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_weights")
POSITION_SCHEMES = ("global", "per_document", "anchor")
LOSS_WEIGHTINGS = ("token", "document")
COUNTER_KEYS = ("documents", "skipped_empty", "skipped_undecodable", "tokens", "rows")

__all__ = [
  "COUNTER_KEYS",
  "LOSS_WEIGHTINGS",
  "POSITION_SCHEMES",
  "ROW_KEYS",
  "DocumentPacker",
  "frame_document",
  "make_positions_np",
  "row_loss_weights",
]


def make_positions_np(segment_ids: np.ndarray, scheme: str) -> np.ndarray:
  """Numpy twin of `lcjax.positional.positions.make_positions` for `[..., T]` segment ids.

  `global` and `anchor` give 0..T-1: AnchorAttention (Wang et al. 2024, arXiv:2411.13476) keeps
  global positions, the shared anchor at 0 and the documents after it at 1, 2, ... with no reset
  (haonan3/AnchorContext `train.py`, FlexAttention path: `rotary_position_ids = torch.arange(...)`);
  its anchor lives in the mask. `per_document` restarts at 0 wherever the segment id changes
  (Megatron-LM's `--reset-position-ids`; ProLong keeps global positions), padding included.
  """
  if scheme not in POSITION_SCHEMES:
    raise ValueError(
      f"position scheme {scheme!r} is unknown; choose one of {', '.join(POSITION_SCHEMES)}"
    )
  segment_ids = np.asarray(segment_ids)
  length = segment_ids.shape[-1]
  t = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
  if scheme in ("global", "anchor"):
    return np.array(t, dtype=np.int32)
  changed = segment_ids[..., 1:] != segment_ids[..., :-1]
  first = np.ones(segment_ids.shape[:-1] + (1,), dtype=bool)
  is_start = np.concatenate([first, changed], axis=-1)
  start = np.maximum.accumulate(np.where(is_start, t, 0), axis=-1)
  return (t - start).astype(np.int32)


def row_loss_weights(segment_ids_T: np.ndarray, loss_mask_T: np.ndarray, weighting: str):
  """Returns `loss_weights_T` float32 for one row from its segments and 0/1 loss mask.

  - `token`: the mask itself; every predicted token weighs 1.
  - `document`: the loss weighting of LWM (Liu et al. 2024, "World Model on Million-Length Video
    and Language with Blockwise RingAttention", arXiv:2402.08268): each example weighs equally,
    not each token. Each loss token of document piece `s` weighs `1 / n_s`, where `n_s` is the
    piece's number of loss tokens, so every piece sums to 1 and the row to its number of pieces.
    The train step divides `sum(w * nll)` by `sum(w)` over the whole global batch (all rows, all
    micro-batches of `train.grad_accum`, all data-parallel shards: `lcjax.train.step`), which is
    then the mean over the batch's pieces of each piece's mean loss. That is LWM's loss,
    `cross_entropy_loss_and_accuracy` (haoliuhl/tux `tux/loss.py` at 61c11e1, lines 29-46,
    called by LargeWorldModel/LWM `lwm/train.py` at f45d2b7, line 177):
    `-mean(sum(log p where valid) / sum(valid))`, the mean over each example's valid tokens,
    then the mean over the batch's examples.

  An example there is one row of the batch. LWM's padded loader puts one document in a row and
  cuts it to `seq_length + 1` tokens, dropping the rest (LWM `lwm/data.py`, `_iter_pad`, and
  `JsonDataset.__iter__` with `pad`), so an example never spans rows; its unpadded loader chunks
  a token stream without document boundaries and weighs rows, not documents. Here a document
  longer than a row is kept, as several pieces, and each piece is one example weighing 1 like a
  short document. So a piece's weight does not depend on the row or batch it lands in: a 7-token
  document in one row and four 1-token documents in another weigh 1/5 each in their batch. The
  `sum(w)` that the train step reports as `loss_tokens` is then the number of pieces with a loss
  token, not a number of tokens.
  """
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(
      f"loss_weighting {weighting!r} is unknown; choose one of {', '.join(LOSS_WEIGHTINGS)}"
    )
  mask_T = np.asarray(loss_mask_T, dtype=np.float32)
  if weighting == "token":
    return mask_T
  segment_ids_T = np.asarray(segment_ids_T)
  counts = np.bincount(segment_ids_T, weights=mask_T)
  per_token = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
  return (mask_T * per_token[segment_ids_T]).astype(np.float32)


def frame_document(tokens: np.ndarray, bos_id: int | None, eos_id: int) -> np.ndarray:
  """Returns `[bos] + tokens + [eos]` as int32; `tokens + [eos]` when `bos_id` is None."""
  tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
  head = [] if bos_id is None else [bos_id]
  return np.concatenate([head, tokens, [eos_id]]).astype(np.int32)


class DocumentPacker:
  """Packs a random-access stream of raw documents into rows; checkpointable by cursor.

  Args:
    documents: the document stream, anything with `__getitem__(int)` and `__len__` (a grain
      `MapDataset`, possibly repeated without end). Reading stops at `len(documents)`.
    encode: raw document -> int32 token array without special tokens.
    seq_len: row length T.
    bos_id, eos_id, pad_id: special token ids.
    position_scheme: one of `POSITION_SCHEMES`.
    loss_weighting: one of `LOSS_WEIGHTINGS`.
    skip_errors: exception types raised by `encode` for undecodable documents; such documents
      are skipped and counted in `skipped_undecodable`.
    epoch_size: number of distinct documents; if that many documents in a row are skipped, the
      corpus has nothing to train on and the packer raises instead of looping forever.

  The state (`get_state`) is the stream cursor, the number of tokens of the current document
  already emitted, and the counters (`COUNTER_KEYS`): `documents` (documents started),
  `skipped_empty`, `skipped_undecodable`, `tokens` (non-padding tokens emitted, anchors
  included) and `rows`.

  With `position_scheme="anchor"`, index 0 of every row is the shared anchor, `bos_id` (for a
  tokenizer without a BOS token `lcjax.data.tokenizers` sets `bos_id` to its EOS, as the
  reference picks its anchor: `anchor_token = tokenizer.bos_token_id if ... else
  tokenizer.eos_token_id`, AnchorContext `train.py` line 466). The documents follow from index
  1, framed as `tokens + [eos]`, and the anchor has

  - position 0, and the documents global positions 1, 2, ... (`make_positions_np`);
  - segment id 1, the id of the row's first piece. The mask does not read it: lcjax's anchor is
    key index 0 (`MaskSpec.anchor`), which every query sees, and its query sees only itself.
    The reference gives the anchor document id 0 because its mask finds the anchor by id
    (`generate_doc_mask_mod`, line 389: `document_id[kv_idx] == 0`); here 0 means padding.
    Sharing the first piece's id puts the anchor's one prediction in that piece for `document`
    weighting;
  - target: the row's first content token, as in the reference, whose labels are the inputs
    shifted by one (`target_ids = ...[..., 1:]`, line 576) with every position in the loss, so
    the anchor predicts it. The anchor itself is never a target;
  - loss weight 1 when that token starts a document (the anchor is the document's BOS), 0 when
    it continues one from the previous row, whose last position already predicted it with the
    document's context. The reference predicts such a token only from the anchor because its rows
    end with a token that is a target but no input; here each token is still predicted once.

  Deviation: the first token of the second and later documents of a row is not a loss target.
  The reference (no `eos`, no target masking) trains the previous document's last token to
  predict it across the document boundary; lcjax masks every cross-document target, in every
  scheme.
  """

  def __init__(
    self,
    documents: Any,
    encode: Callable[[Any], np.ndarray],
    *,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    position_scheme: str = "global",
    loss_weighting: str = "token",
    skip_errors: tuple[type[BaseException], ...] = (UnicodeError,),
    epoch_size: int | None = None,
  ):
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if position_scheme not in POSITION_SCHEMES:
      raise ValueError(
        f"position_scheme {position_scheme!r} is unknown; "
        f"choose one of {', '.join(POSITION_SCHEMES)}"
      )
    if loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(
        f"loss_weighting {loss_weighting!r} is unknown; choose one of {', '.join(LOSS_WEIGHTINGS)}"
      )
    self._documents = documents
    self._encode = encode
    self._seq_len = seq_len
    self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
    self._position_scheme = position_scheme
    # AnchorAttention: one shared BOS anchor per row, so documents carry none of their own.
    self._anchor = position_scheme == "anchor"
    self._loss_weighting = loss_weighting
    self._skip_errors = tuple(skip_errors)
    self._epoch_size = epoch_size
    self._cursor = 0
    self._offset = 0
    self._counters = dict.fromkeys(COUNTER_KEYS, 0)
    self._current: np.ndarray | None = None  # framed tokens of the document at the cursor

  def get_state(self) -> dict[str, Any]:
    return {"cursor": self._cursor, "offset": self._offset, "counters": dict(self._counters)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._cursor = int(state["cursor"])
    self._offset = int(state["offset"])
    self._counters = {key: int(state["counters"][key]) for key in COUNTER_KEYS}
    self._current = None

  @property
  def counters(self) -> dict[str, int]:
    return dict(self._counters)

  def _load_current(self) -> np.ndarray | None:
    """Loads the document at the cursor, skipping empty and undecodable ones; None at the end."""
    if self._current is not None:
      return self._current
    skipped_in_a_row = 0
    while self._cursor < len(self._documents):
      try:
        tokens = self._encode(self._documents[self._cursor])
      except self._skip_errors:
        tokens = None
        self._counters["skipped_undecodable"] += 1
      else:
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size == 0:
          tokens = None
          self._counters["skipped_empty"] += 1
      if tokens is not None:
        if self._offset == 0:
          self._counters["documents"] += 1
        bos_id = None if self._anchor else self._bos_id
        self._current = frame_document(tokens, bos_id, self._eos_id)
        return self._current
      self._cursor += 1
      self._offset = 0
      skipped_in_a_row += 1
      if self._epoch_size is not None and skipped_in_a_row >= self._epoch_size:
        raise ValueError(
          f"all {self._epoch_size} documents of the source are empty or undecodable; "
          "point data.source at a corpus with text"
        )
    return None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    length = self._seq_len
    tokens_T = np.full(length, self._pad_id, dtype=np.int32)
    targets_T = np.full(length, self._pad_id, dtype=np.int32)
    segment_ids_T = np.zeros(length, dtype=np.int32)
    loss_mask_T = np.zeros(length, dtype=np.float32)
    filled = 0
    segment = 0
    if self._anchor:
      if self._load_current() is None:
        raise StopIteration
      # Slot 0 is the shared anchor (class docstring). Its target, the row's first content
      # token, is set after the loop; it counts only when that token starts a document.
      anchor_weight = 1.0 if self._offset == 0 else 0.0
      tokens_T[0] = self._bos_id
      segment_ids_T[0] = 1
      filled = 1
    while filled < length:
      doc = self._load_current()
      if doc is None:
        break
      start = self._offset
      stop = min(doc.size, start + length - filled)
      size = stop - start
      segment += 1
      tokens_T[filled : filled + size] = doc[start:stop]
      segment_ids_T[filled : filled + size] = segment
      # Targets inside the piece, plus the document's next token if the piece was cut short.
      next_stop = min(doc.size, stop + 1)
      num_targets = next_stop - start - 1
      targets_T[filled : filled + num_targets] = doc[start + 1 : next_stop]
      loss_mask_T[filled : filled + num_targets] = 1.0
      filled += size
      if stop == doc.size:
        self._cursor += 1
        self._offset = 0
        self._current = None
      else:
        self._offset = stop
    if filled == 0:
      raise StopIteration
    if self._anchor:
      targets_T[0] = tokens_T[1]
      loss_mask_T[0] = anchor_weight
    self._counters["tokens"] += filled
    self._counters["rows"] += 1
    return {
      "tokens": tokens_T,
      "targets": targets_T,
      "segment_ids": segment_ids_T,
      "positions": make_positions_np(segment_ids_T, self._position_scheme),
      "loss_weights": row_loss_weights(segment_ids_T, loss_mask_T, self._loss_weighting),
    }
