"""Parameter and training-state shardings from one table of path rules.

Each parameter path (e.g. 'layers/3/mlp/gate_proj/kernel') gets logical axis names
from `PARAM_RULES`; `lcjax.parallel.mesh.LOGICAL_RULES` maps those to mesh axes
(FSDP on 'embed', tensor parallelism on heads/MLP/vocabulary). Optimizer-state leaves
(AdamW's mu and nu) end with the path of their parameter and get the same sharding,
so a new parallelism is a new rule, not an edit across the model. A dimension that
its mesh axes do not divide stays replicated (tiny test models on 8 devices).
"""

from __future__ import annotations

import re

import jax
from jax.sharding import Mesh, NamedSharding

from lcjax.models.stacking import stacked_path
from lcjax.parallel.mesh import fit_spec, logical_to_spec
from lcjax.pytree import path_str

__all__ = ["PARAM_RULES", "param_logical_axes", "tree_shardings", "batch_sharding"]

# (regex on the path, logical names of the array's dimensions), first match wins.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  (r"embed_tokens/embedding$", ("vocab", "embed")),
  (r"self_attn/q_proj/kernel$", ("embed", "heads")),
  (r"self_attn/(k|v)_proj/kernel$", ("embed", "kv_heads")),
  (r"self_attn/q_proj/bias$", ("heads",)),
  (r"self_attn/(k|v)_proj/bias$", ("kv_heads",)),
  (r"self_attn/o_proj/kernel$", ("heads", "embed")),
  (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
  (r"mlp/(gate|up)_proj/bias$", ("mlp",)),
  (r"mlp/down_proj/kernel$", ("mlp", "embed")),
  (r"lm_head/kernel$", ("embed", "vocab")),
  (r"mixer/in_proj/kernel$", ("embed", None)),
  (r"mixer/out_proj/kernel$", (None, "embed")),
)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical names for the array at `path` (all None, i.e. replicated, when no rule matches).

  A stacked layer parameter ('layers/mlp/gate_proj/kernel' [L, D, F], `model.scan_layers`)
  gets its rule's names after a leading "layers" axis.
  """
  stacked = stacked_path(path)
  for pattern, names in PARAM_RULES:
    if re.search(pattern, path) and len(names) + stacked == ndim:
      return ("layers", *names) if stacked else names
  return (None,) * ndim


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a params or train-state pytree (leaves: arrays or ShapeDtypeStructs)."""

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    names = param_logical_axes(path_str(path), len(shape))
    return NamedSharding(mesh, fit_spec(logical_to_spec(names), shape, dict(mesh.shape)))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the batch axes, the sequence over 'context' ([B, T] arrays)."""
  return NamedSharding(mesh, logical_to_spec(("batch", "activation_length")))
