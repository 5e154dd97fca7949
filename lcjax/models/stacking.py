"""Stacked (scanned) and per-layer views of a model's decoder-layer parameters.

With `model.scan_layers` the decoder's layers are one module whose parameters carry a
leading layer axis, run by `jax.lax.scan` (MaxText's `scan_layers`): XLA compiles one
layer instead of L, and remat/offload policies apply per scan iteration, which an
unrolled loop defeats (issue #15). Their paths lose the layer index:

  per layer:  layers/3/mlp/gate_proj/kernel  [D, F]
  stacked:    layers/mlp/gate_proj/kernel    [L, D, F]

Everything that names parameters one layer at a time (Hugging Face tensor names,
`train.freeze` regexes, checkpoints written by unrolled models) goes through these
conversions, so the per-layer names stay the one public spelling. Trees are nested
dicts (pure dicts, `nnx.to_pure_dict`) and tuples/namedtuples (optimizer states);
leaves are arrays or `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
  "LAYERS",
  "adapt_to_stored",
  "has_layer_stack",
  "layers_layout",
  "is_per_layer",
  "per_layer_paths",
  "stack_layers",
  "stacked_path",
  "unstack_layers",
]

LAYERS = "layers"  # the attribute (and path component) that holds the decoder layers


def _is_index(key) -> bool:
  return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def is_per_layer(layers: dict) -> bool:
  """True for {0: {...}, 1: {...}} (unrolled), False for {'mlp': ..., ...} (stacked)."""
  return bool(layers) and all(_is_index(k) for k in layers)


def layers_layout(tree: Any) -> str | None:
  """'stacked' or 'per_layer' by the first `layers` dict in `tree`; None when it has none.

  Works on orbax metadata trees too (nested dicts with string keys).
  """

  def visit(node):
    if isinstance(node, dict):
      if isinstance(node.get(LAYERS), dict) and node[LAYERS]:
        return "per_layer" if is_per_layer(node[LAYERS]) else "stacked"
      children = node.values()
    elif isinstance(node, tuple | list):
      children = node
    else:
      return None
    for child in children:
      found = visit(child)
      if found:
        return found
    return None

  return visit(tree)


def has_layer_stack(tree: Any) -> bool:
  """True when `tree`'s decoder layers are stacked (its leaves carry the layer axis)."""
  return layers_layout(tree) == "stacked"


def adapt_to_stored(target: Any, stored_layout: str | None):
  """(restore target, convert) to read a checkpoint whose layers are `stored_layout`.

  A checkpoint written by an unrolled model ('per_layer') restores into a scanned
  model by reading it per layer and stacking, and the reverse: `convert(restored)`
  gives the tree in `target`'s layout. Same layout: `target` and the identity.
  """
  mine = layers_layout(target)
  if stored_layout is None or mine is None or stored_layout == mine:
    return target, lambda tree: tree
  if stored_layout == "per_layer":
    return unstack_layers(target), stack_layers
  return stack_layers(target), unstack_layers


def _rebuild(node, fn):
  """`node` with every dict's `layers` entry replaced by fn(entry), recursively."""
  if isinstance(node, dict):
    out = {k: _rebuild(v, fn) for k, v in node.items()}
    if isinstance(out.get(LAYERS), dict):
      out[LAYERS] = fn(out[LAYERS])
    return out
  if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple (optax states)
    return type(node)(*(_rebuild(v, fn) for v in node))
  if isinstance(node, tuple | list):
    return type(node)(_rebuild(v, fn) for v in node)
  return node


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  return jnp.stack(leaves)


def _take(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[i]


def stack_layers(tree: Any) -> Any:
  """Per-layer `layers/{i}/...` subtrees -> one stacked subtree (arrays: jnp.stack)."""

  def stack(layers: dict):
    if not is_per_layer(layers):
      return layers
    ordered = [layers[k] for k in sorted(layers, key=int)]
    return jax.tree.map(_stack_leaves, *ordered)

  return _rebuild(tree, stack)


def unstack_layers(tree: Any, *, index_type=int) -> Any:
  """Stacked `layers/...` subtrees -> per-layer `layers/{i}/...` (arrays sliced, structs reshaped).

  `index_type` is the key type of the per-layer dict: int as `nnx.to_pure_dict` gives,
  str as orbax's checkpoint trees hold.
  """

  def unstack(layers: dict):
    if is_per_layer(layers):
      return layers
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {
      index_type(i): jax.tree.map(lambda x, i=i: _take(x, i), layers) for i in range(num_layers)
    }

  return _rebuild(tree, unstack)


def stacked_path(path: str) -> bool:
  """True for a stacked parameter path ('layers/mlp/...'), False for 'layers/3/mlp/...'."""
  parts = path.split("/")
  return (
    LAYERS in parts
    and parts.index(LAYERS) + 1 < len(parts)
    and not _is_index(parts[parts.index(LAYERS) + 1])
  )


def per_layer_paths(path: str, num_layers: int) -> list[str]:
  """The per-layer spellings of a stacked path: 'layers/mlp/k' -> ['layers/0/mlp/k', ...]."""
  parts = path.split("/")
  at = parts.index(LAYERS) + 1
  return ["/".join(parts[:at] + [str(i)] + parts[at:]) for i in range(num_layers)]
