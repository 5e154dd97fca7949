"""Two processes (4 CPU devices each, gloo over 127.0.0.1) form one mesh and match one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from multiprocess_case import run_case

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  out = tmp_path / "result.json"
  env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), coordinator, str(i), str(out)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  multi = json.loads(out.read_text())

  single = run_case(mesh_axes=dict(data=2, context=4))  # this process: 8 devices
  # fp32 with the same per-device computation; only the cross-process transport differs.
  np.testing.assert_allclose(multi["attn_out"], single["attn_out"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(multi["attn_grad"], single["attn_grad"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)


@pytest.mark.slow  # ~35 s; test_two_processes_match_one covers the cross-process step
def test_two_process_training_run_saves_and_resumes(tmp_path):
  """scripts/train.py with --coordinator: one mesh over both processes, one set of outputs."""
  root = os.path.dirname(HERE)
  flags = [
    f"--config={root}/configs/quickstart.py:tiny,seq_len=64",
    f"--workdir={tmp_path}",
    "--config.model.max_position_embeddings=64",
    "--config.model.rope.max_position_embeddings=64",
    "--config.model.d_model=32",
    "--config.model.mlp_dim=64",
    "--config.mesh.data=2",
    "--config.mesh.context=4",
    "--config.train.batch_size=4",
    "--config.checkpoint.every_steps=2",
    "--config.eval.every_steps=0",
    "--config.train.log_every=1",
  ]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
    + os.environ.get("LCJAX_TEST_XLA_FLAGS", ""),
  }

  def run(steps):
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          os.path.join(root, "scripts", "train.py"),
          *flags,
          f"--config.train.steps={steps}",
          f"--coordinator={coordinator}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs

  run(4)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  logs = run(6)
  assert "resumed from" in logs[0] and "resumed from" not in logs[1]  # process 0 reports
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6]  # written once, by process 0
