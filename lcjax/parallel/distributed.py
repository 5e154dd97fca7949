"""Multi-host start-up: `jax.distributed.initialize()` when the environment asks for it.

Three ways a run becomes multi-process: explicit flags (`--coordinator`,
`--num_processes`, `--process_id`, e.g. several processes on one machine over
127.0.0.1), a SLURM allocation with more than one task, or a TPU pod slice (where
JAX finds the coordinator itself). On CPU the collectives go over gloo.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["maybe_initialize", "wants_distributed", "gather_json", "process_local_to_global"]


def wants_distributed(coordinator: str | None = None) -> bool:
  """True when flags or the environment (SLURM, TPU pod) describe a multi-process job."""
  if coordinator:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES")) and "," in os.environ["TPU_WORKER_HOSTNAMES"]


def maybe_initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Initializes jax.distributed if the job is multi-process; returns whether it did."""
  if not wants_distributed(coordinator):
    return False
  if coordinator and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id as well")
  # gloo is the CPU collectives backend (the default in jax 0.10.2; set it explicitly so a
  # changed default cannot turn cross-process collectives into errors).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()  # SLURM / TPU pod: JAX reads the environment
  return True


def gather_json(obj) -> dict[str, object]:
  """{process index: obj of that process}, the same on every process.

  Used for data-iterator states, which differ per process: the primary host writes
  them all into the checkpoint and each process restores its own entry.
  """
  if jax.process_count() == 1:
    return {"0": obj}

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: data.size] = data
  rows = multihost_utils.process_allgather(padded[None], tiled=True)
  return {
    str(i): json.loads(bytes(rows[i, : int(lengths[i][0])]).decode()) for i in range(len(rows))
  }


def process_local_to_global(local: np.ndarray, sharding) -> jax.Array:
  """A global [rows * process_count, ...] array from each process's rows."""
  global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
