"""Named activation-checkpointing policies per decoder layer (`model.remat`).

Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost") keeps a layer's input and recomputes its internals in the backward pass. The
policies, from most memory to least:

  none          keep every intermediate autodiff needs (no recomputation).
  save_dots     keep matmul outputs without batch dimensions, recompute the rest
                (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
  full          keep only each layer's input; recompute the layer.
  offload_dots  move those matmul outputs to host memory (pinned_host) instead of keeping
                them on the device (`offload_dot_with_no_batch_dims`).
  offload       move each layer's input to host memory, recompute the layer (MEMO-style
                activation offload, Zhao et al. 2025; MaxText's "offload" remat policy):
                device memory no longer grows with depth × tokens.

The layer input is tagged `checkpoint_name(x, "layer_in")` as the first op of every block
(`tag_layer_input`), the name the offload policy moves. Offload only lowers device memory
when the layers run under `jax.lax.scan` (`model.scan_layers`): in an unrolled loop XLA
completes the copy to host just before the backward pass needs it (issue #15's
prototype). Every policy computes the same gradients as `none` (tests/test_scan_layers.py).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from lcjax.config import require

__all__ = [
  "REMAT_POLICIES",
  "LAYER_INPUT",
  "checkpoint_policy",
  "remat",
  "tag_layer_input",
  "validate_remat",
]

REMAT_POLICIES = ("none", "full", "save_dots", "offload", "offload_dots")
LAYER_INPUT = "layer_in"
_RENAMED = {"dots": "save_dots"}


def validate_remat(name, field: str = "model.remat") -> None:
  """ConfigError naming `field` for an unknown (or renamed) policy."""
  require(
    name not in _RENAMED,
    f"{field}={name!r} is now called {_RENAMED.get(name)!r}; set {field}={_RENAMED.get(name)!r}",
  )
  require(name in REMAT_POLICIES, f"{field}={name!r} is unknown; use one of {REMAT_POLICIES}")


def checkpoint_policy(name: str):
  """The `jax.checkpoint` policy of a named remat policy (None: save nothing but inputs)."""
  policies = jax.checkpoint_policies
  if name == "full":
    return None
  if name == "save_dots":
    return policies.dots_with_no_batch_dims_saveable
  if name == "offload":
    return policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[],
      names_which_can_be_offloaded=[LAYER_INPUT],
      offload_src="device",
      offload_dst="pinned_host",
    )
  if name == "offload_dots":
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"remat policy {name!r} has no checkpoint policy; use one of {REMAT_POLICIES}")


def remat(fn, name: str):
  """A scan body `fn` under the named policy (`fn` itself for "none").

  `prevent_cse=False` is right inside `jax.lax.scan` only (the loop already keeps XLA
  from merging the recomputation with the forward pass; `jax.checkpoint`'s docstring).
  """
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=checkpoint_policy(name), prevent_cse=False)


def tag_layer_input(x):
  """Names a block's input so the `offload` policy can move it to host memory."""
  return checkpoint_name(x, LAYER_INPUT)
