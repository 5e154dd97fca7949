"""Position-id schemes for packed rows.

A packed row holds several documents, told apart by `segment_ids_BT` (a document starts where the
segment id changes). The scheme decides which RoPE position each token gets; which tokens may
attend to which is a separate question, answered by the attention mask (`MaskSpec`):

- `global`: positions 0..T-1 across the whole row, regardless of documents (plain packing).
- `per_document`: positions restart at 0 at each document start, as Megatron-LM's
  `--reset-position-ids` (`megatron/core/datasets/gpt_dataset.py::_get_ltor_masks_and_position_ids`)
  and transformers' `DataCollatorWithFlattening` do. Padding with its own segment id counts as a
  document. ProLong (Gao et al. 2024, arXiv:2410.02660) does not reset: princeton-nlp/ProLong
  `training/modeling_flash_llama.py` rotates the whole packed row and `trainer.py` passes
  `position_ids=start_index`, i.e. `global` plus the document mask. The two give equal logits
  only in exact arithmetic and only for purely relative RoPE: not in bf16, not for
  `dynamic`/`longrope` (they read `max(positions)+1`), and not for `eabf` (its query scale reads
  the absolute position).
- `anchor`: AnchorAttention (Wang et al. 2024, "When Precision Meets Position: BFloat16 Breaks
  Down RoPE in Long-Context Training", arXiv:2411.13476; haonan3/AnchorContext `train.py`). The
  packer (`lcjax.data.packing.DocumentPacker`) starts every row with one shared anchor, the BOS
  token, at index and position 0, and frames the documents after it without their own BOS
  (`add_anchor_token_to_inputs`). All tokens keep their global positions, so the positions equal
  `global`: the reference's FlexAttention path uses `rotary_position_ids = torch.arange(...)`
  (`train.py` at 3af89f2, line 588).
  What makes it AnchorAttention is the mask: `MaskSpec(document=True, anchor=True)`
  (`model.anchor=True`, which `lcjax.train.config.validate_config` requires with this scheme)
  lets each token see its own document plus the anchor (key 0), the reference's
  `generate_doc_mask_mod` (lines 386-398). The reference's FlashAttention path instead keeps
  each document's BOS and moves it to position 0. That attends the same way (a BOS at position 0
  that sees only itself has the shared anchor's keys and values), but each BOS takes a slot of
  the row, so later documents sit one position further per document before them.
"""

import jax
import jax.numpy as jnp

POSITION_SCHEMES = ("global", "per_document", "anchor")


def make_positions(segment_ids_BT: jax.Array, scheme: str) -> jax.Array:
  """Returns `positions_BT` int32 for `scheme` (one of `POSITION_SCHEMES`).

  Pure jnp; jit it with `scheme` static, e.g.
  `jax.jit(make_positions, static_argnames="scheme")`.
  """
  if scheme not in POSITION_SCHEMES:
    raise ValueError(
      f"position scheme {scheme!r} is unknown; choose one of {', '.join(POSITION_SCHEMES)}"
    )
  segment_ids_BT = jnp.asarray(segment_ids_BT)
  if segment_ids_BT.ndim != 2:
    raise ValueError(f"segment_ids_BT must have shape [B, T], got {segment_ids_BT.shape}")
  batch, length = segment_ids_BT.shape
  t_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if scheme in ("global", "anchor"):
    return t_BT
  # per_document: position = t - (index of the latest document start at or before t).
  changed_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
  is_start_BT = jnp.concatenate([jnp.ones((batch, 1), dtype=bool), changed_BT], axis=1)
  start_BT = jax.lax.cummax(jnp.where(is_start_BT, t_BT, 0), axis=1)
  return t_BT - start_BT
