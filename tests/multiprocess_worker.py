"""One process of the 2-process test (tests/test_multiprocess.py): 4 CPU devices each.

Runs ring attention and one training step on a global mesh (data=2, context=4) across
both processes, over gloo on 127.0.0.1, and writes the results as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 " + os.environ.get(
  "LCJAX_TEST_XLA_FLAGS", ""
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from lcjax.parallel.distributed import maybe_initialize  # noqa: E402


def main(coordinator: str, process_id: int, out_path: str) -> None:
  maybe_initialize(coordinator, num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8

  from multiprocess_case import run_case

  result = run_case(mesh_axes=dict(data=2, context=4), process_local=True)
  if jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
