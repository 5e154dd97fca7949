"""Tests for lcjax.positional.positions on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.positional import positions

# Two packed rows of three documents each. Row 1 reuses id 1 for its third document: a document
# starts wherever the id changes, not where a new id first appears.
SEGMENT_IDS_BT = np.array(
  [
    [1, 1, 1, 2, 2, 3, 3, 3, 3, 3],
    [1, 1, 1, 1, 2, 2, 2, 1, 1, 1],
  ],
  dtype=np.int32,
)


def _per_document_loop(segment_ids_BT):
  """Independent reference: a counter that restarts whenever the segment id changes."""
  out = np.zeros_like(segment_ids_BT)
  for b, row in enumerate(segment_ids_BT):
    for t in range(1, len(row)):
      out[b, t] = 0 if row[t] != row[t - 1] else out[b, t - 1] + 1
  return out


@pytest.mark.parametrize("jit", [False, True])
def test_schemes_on_packed_rows(jit):
  fn = (
    jax.jit(positions.make_positions, static_argnames="scheme")
    if jit
    else (positions.make_positions)
  )
  global_BT = fn(jnp.asarray(SEGMENT_IDS_BT), scheme="global")
  per_doc_BT = fn(jnp.asarray(SEGMENT_IDS_BT), scheme="per_document")
  anchor_BT = fn(jnp.asarray(SEGMENT_IDS_BT), scheme="anchor")
  for out in (global_BT, per_doc_BT, anchor_BT):
    assert out.shape == SEGMENT_IDS_BT.shape and out.dtype == jnp.int32

  np.testing.assert_array_equal(global_BT, np.tile(np.arange(10), (2, 1)))
  np.testing.assert_array_equal(per_doc_BT, _per_document_loop(SEGMENT_IDS_BT))
  np.testing.assert_array_equal(
    per_doc_BT, [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
  )
  # AnchorAttention: the shared anchor (token 0) is at 0 and nothing resets at document starts.
  np.testing.assert_array_equal(anchor_BT, global_BT)
  assert (anchor_BT[:, 0] == 0).all() and (anchor_BT[:, 3] == 3).all()


def test_per_document_single_document_is_global():
  segment_ids_BT = jnp.ones((3, 7), jnp.int32)
  np.testing.assert_array_equal(
    positions.make_positions(segment_ids_BT, "per_document"),
    positions.make_positions(segment_ids_BT, "global"),
  )


def test_bad_input():
  with pytest.raises(
    ValueError,
    match=r"position scheme 'reset' is unknown; choose one of "
    r"global, per_document, anchor",
  ):
    positions.make_positions(SEGMENT_IDS_BT, "reset")
  with pytest.raises(ValueError, match=r"segment_ids_BT must have shape \[B, T\]"):
    positions.make_positions(SEGMENT_IDS_BT[0], "global")
