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
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

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

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None."""
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
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
      return step, restored["state"], restored["data"]
    return None

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
    return step, restored["state"]["params"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
