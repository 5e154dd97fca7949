"""Optimizer and learning-rate schedule from `config.train`.

AdamW (Loshchilov & Hutter 2019) with linear warmup followed by cosine, linear or
constant decay, global-norm gradient clipping, weight decay on matrices only, and
parameter freezing by regex over parameter paths (e.g. LongLoRA's "train the
embeddings and norms" is `freeze=(r".*",)` with `trainable=(r"embed", r"norm")`).
"""

from __future__ import annotations

import re

import jax
import optax

from lcjax.config import require
from lcjax.models.stacking import per_layer_paths, stacked_path
from lcjax.pytree import path_str

__all__ = ["make_schedule", "make_optimizer", "param_labels"]

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(tc) -> optax.Schedule:
  """Warmup 0 -> `tc.lr` over `tc.warmup_steps`, then `tc.schedule` down to `lr*min_lr_ratio`."""
  require(tc.schedule in SCHEDULES, f"train.schedule={tc.schedule!r} is unknown; use {SCHEDULES}")
  require(tc.lr > 0, f"train.lr={tc.lr} must be > 0")
  require(0 <= tc.warmup_steps, f"train.warmup_steps={tc.warmup_steps} must be >= 0")
  end = tc.lr * tc.min_lr_ratio
  decay_steps = max(tc.steps - tc.warmup_steps, 1)
  if tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr_ratio)
  elif tc.schedule == "linear":
    decay = optax.linear_schedule(tc.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(tc.lr)
  if tc.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
  return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def param_labels(params, tc):
  """'trainable' or 'frozen' for every parameter leaf, from train.freeze / train.trainable.

  A parameter is frozen when its path matches a `freeze` regex and no `trainable` regex.
  """
  freeze = [re.compile(p) for p in tc.freeze]
  trainable = [re.compile(p) for p in tc.trainable]

  def frozen(name: str) -> bool:
    return any(p.search(name) for p in freeze) and not any(p.search(name) for p in trainable)

  def label(path, leaf):
    name = path_str(path)
    if not stacked_path(name):
      return "frozen" if frozen(name) else "trainable"
    # A stacked parameter (model.scan_layers) holds every layer: the regexes see the
    # per-layer names ('layers/3/mlp/...'), and must select all layers or none.
    per_layer = {frozen(n) for n in per_layer_paths(name, leaf.shape[0])}
    require(
      len(per_layer) == 1,
      f"train.freeze/train.trainable select some layers of {name!r} but not others, and "
      "model.scan_layers stores all layers in one array; set model.scan_layers=False to "
      "freeze single layers",
    )
    return "frozen" if per_layer.pop() else "trainable"

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  # Decay matrices (kernels, embeddings); not norms' scales or biases (1-D per layer; a
  # stacked layer parameter has one more axis).
  def decays(path, x):
    return x.ndim - stacked_path(path_str(path)) >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + clipping + schedule, with frozen parameters' updates set to zero."""
  schedule = make_schedule(tc)
  parts = []
  if tc.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(tc.grad_clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=tc.b1,
      b2=tc.b2,
      eps=tc.eps,
      weight_decay=tc.weight_decay,
      mask=_decay_mask,
    )
  )
  tx = optax.chain(*parts)
  labels = param_labels(params, tc)
  if tc.freeze:
    n_trainable = sum(label == "trainable" for label in jax.tree.leaves(labels))
    require(n_trainable > 0, "train.freeze matches every parameter; add a train.trainable regex")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
