"""Rotary position embeddings with scaling types, and position-id schemes for packed rows."""

# rope_hf_types registers the Hugging Face types and rope_variants the paper variants (abf,
# eabf, giraffe, nope) in ROPE_TYPES.
from lcjax.positional import rope_hf_types, rope_variants  # noqa: F401
from lcjax.positional.positions import POSITION_SCHEMES, make_positions
from lcjax.positional.rope import (
  DEFAULT_ROPE_THETA,
  ROPE_TYPES,
  RopeType,
  apply_rope,
  compute_inv_freq,
  cos_sin_for_positions,
  query_scale,
  register_rope_type,
  rope_cos_sin,
  standardize_rope_parameters,
  to_hf_rope_fields,
  validate_rope_parameters,
)

__all__ = [
  "DEFAULT_ROPE_THETA",
  "POSITION_SCHEMES",
  "ROPE_TYPES",
  "RopeType",
  "apply_rope",
  "compute_inv_freq",
  "cos_sin_for_positions",
  "make_positions",
  "query_scale",
  "register_rope_type",
  "rope_cos_sin",
  "standardize_rope_parameters",
  "to_hf_rope_fields",
  "validate_rope_parameters",
]
