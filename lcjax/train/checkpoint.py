"""Training checkpoints with orbax: `WORKDIR/checkpoints/<step>/{state,data}`.

`state` holds params, optimizer state, step and RNG (orbax StandardSave); `data`
holds the data iterator's JSON state. orbax writes each step into a temporary
folder and renames it when complete, so a half-written checkpoint is never
listed. A complete checkpoint that fails to restore (corrupted files) is moved
aside to `checkpoints/corrupt-<step>` with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from lcjax.interop.safetensors_io import CheckpointError
from lcjax.models.stacking import adapt_to_stored, layers_layout

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores (train state, data-iterator state) pairs by step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
      force=True,
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def _adapt(self, step: int, target: Any):
    """(restore target, convert) for checkpoint `step`'s layer layout (`adapt_to_stored`).

    Checkpoints written before `model.scan_layers` hold per-layer parameters; a scanned
    model reads them per layer and stacks them (and the reverse), with a notice.
    """
    try:  # the stored tree's metadata (a fresh manager has no handler registered to ask)
      folder = pathlib.Path(self.directory, str(step), "state")
      stored = layers_layout(ocp.PyTreeCheckpointHandler().metadata(folder).tree)
    except Exception:  # noqa: BLE001 - no readable metadata: restore as is, fail there
      return target, lambda tree: tree
    restore_target, convert = adapt_to_stored(target, stored)
    if restore_target is not target:
      log.warning(
        "checkpoint %s/%d holds %s decoder layers and the model %s ones; converting while "
        "restoring (model.scan_layers)",
        self.directory,
        step,
        stored.replace("_", "-"),
        layers_layout(target).replace("_", "-"),
      )
    return restore_target, convert

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None."""
    for step in reversed(self.steps()):
      try:
        target, convert = self._adapt(step, abstract_state)
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        aside = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        log.warning(
          "checkpoint %s/%d does not restore (%s: %s); moved it to %s and trying the previous one",
          self.directory,
          step,
          type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else "",
          aside,
        )
        os.rename(os.path.join(self.directory, str(step)), aside)
        self._manager.reload()
        continue
      state = restored["state"]
      if target is not abstract_state:  # stacked or unstacked, placed as the target asks
        state = jax.tree.map(
          lambda x, t: x if t.sharding is None else jax.device_put(x, t.sharding),
          convert(state),
          abstract_state,
        )
      return step, state, restored["data"]
    return None

  def restore_state(self, abstract_state: Any) -> tuple[int, Any]:
    """(step, train state) of the newest checkpoint, read into `abstract_state`'s structure.

    For reading another run's checkpoint (`train.carry_optimizer_state`): a checkpoint
    that does not restore raises `CheckpointError` and is left where it is.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"{self.directory} has no complete checkpoint")
    step = steps[-1]
    target, convert = self._adapt(step, abstract_state)
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a tree mismatch
      raise CheckpointError(
        f"{self.directory}/{step} does not restore into this run's train state "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the "
        "optimizer (train.freeze, clipping) must match the run it is carried from"
      ) from None
    state = restored["state"]
    if target is not abstract_state:
      state = convert(state)
    return step, state

  def restore_params(self, abstract_params: Any, *, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of checkpoint `step` (default the newest), without the optimizer state.

    Only the `params` subtree of `state` is read (orbax partial restore), placed on the
    first local device: what evaluation and export need, for any optimizer.
    """
    step = self.steps()[-1] if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
      "params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params
      )
    }
    target, convert = self._adapt(step, target)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        ),
        data=ocp.args.JsonRestore(),
      ),
    )
    return step, convert(restored["state"])["params"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
