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
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.parallel.mesh import logical_to_spec
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
  """Logical names for the array at `path` (all None, i.e. replicated, when no rule matches)."""
  for pattern, names in PARAM_RULES:
    if re.search(pattern, path) and len(names) == ndim:
      return names
  return (None,) * ndim


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Replicates the dimensions whose mesh axes do not divide them."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if size > 1 and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a params or train-state pytree (leaves: arrays or ShapeDtypeStructs)."""

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    names = param_logical_axes(path_str(path), len(shape))
    return NamedSharding(mesh, _fit(logical_to_spec(names), shape, mesh))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the batch axes, the sequence over 'context' ([B, T] arrays)."""
  return NamedSharding(mesh, logical_to_spec(("batch", "activation_length")))
