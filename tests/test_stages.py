"""Multi-stage runs (`config.stages`, lcjax.sweep.stages): a chain of runs in WORKDIR/stage-<k>/."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.config import ConfigError, load_config
from lcjax.sweep.stages import largest_stage, run_stages, stage_configs, stages_spec
from lcjax.train.run_model import load_run_params

LONG = {
  "data.seq_len": 64,
  "model.max_position_embeddings": 64,
  "model.rope.max_position_embeddings": 64,
  "model.rope.rope_theta": 40000.0,
}
# Stage 2 carries stage 1's optimizer state; stage 3 (same shapes) starts a fresh one.
NO_PPL = {"eval.ppl_lengths": ()}  # only the last stage evaluates (the test's time)
STAGES = (
  {"train.steps": 3, **NO_PPL},
  {**LONG, "train.steps": 2, "train.carry_optimizer_state": True, **NO_PPL},
  {**LONG, "train.steps": 1},
)


def _config(stages=STAGES):
  return load_config(
    "configs/quickstart.py:tiny,seq_len=32",
    {
      "train.warmup_steps": 1,
      "train.log_every": 1,
      "checkpoint.every_steps": 1,
      "checkpoint.keep": 5,
      "checkpoint.async_save": False,
      "eval.ppl_lengths": (64,),
      "eval.ppl_max_documents": 1,
      "eval.ppl_max_tokens_per_document": 257,  # 4 windows, not the whole document
      "eval.rope_variants": {},
      "stages": stages,
    },
  )


def _adam_counts(run_dir: str, step: int) -> set[int]:
  """Every `count` leaf of a checkpoint's optimizer state (AdamW's and the schedule's)."""
  with ocp.StandardCheckpointer() as reader:
    tree = reader.restore(os.path.join(run_dir, "checkpoints", str(step), "state"))
  counts = set()

  def visit(node, key=""):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(v, k)
    elif isinstance(node, list | tuple):
      for v in node:
        visit(v, key)
    elif key == "count":
      counts.add(int(np.asarray(node)))

  visit(tree["opt_state"])
  return counts


def test_stages_run_in_order_resume_mid_chain_and_never_rerun(tmp_path, capsys):
  workdir = str(tmp_path / "chain")
  result = run_stages(_config(), workdir)
  assert result["ran"] == ["stage-1", "stage-2", "stage-3"]
  # Stage 2 starts from stage 1's weights with its own RoPE θ (as a model override).
  stage2_model = json.load(open(os.path.join(workdir, "stage-2", "model_config.json")))
  assert stage2_model["rope"]["rope_theta"] == 40000.0
  assert stage2_model["max_position_embeddings"] == 64
  assert json.load(open(os.path.join(workdir, "stage-1", "config.json")))["data"]["seq_len"] == 32
  # The optimizer state came along: AdamW's count continues from stage 1's 3 steps; stage 3,
  # without train.carry_optimizer_state, counts only its own step.
  assert _adam_counts(os.path.join(workdir, "stage-2"), 2) == {5}
  assert _adam_counts(os.path.join(workdir, "stage-3"), 1) == {1}
  assert capsys.readouterr().out.count("optimizer state carried over") == 1
  params_done, _, _ = load_run_params(os.path.join(workdir, "stage-2"))
  for name in ("results.csv", "results.md", "plots/stages_loss.png", "plots/stages_ppl.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert "stage-2" in open(os.path.join(workdir, "results.md")).read()

  # A finished chain reruns nothing.
  assert run_stages(_config(), workdir)["ran"] == []
  # Interrupted in stage 2 (after its step 1): the rerun skips stage 1 and resumes stage 2.
  os.remove(os.path.join(workdir, "stage-2", "sweep_point.json"))
  shutil.rmtree(os.path.join(workdir, "stage-2", "checkpoints", "2"))
  capsys.readouterr()
  assert run_stages(_config(), workdir)["ran"] == ["stage-2"]
  assert "resumed from" in capsys.readouterr().out
  params_resumed, _, _ = load_run_params(os.path.join(workdir, "stage-2"))
  import jax  # noqa: PLC0415

  jax.tree.map(np.testing.assert_array_equal, params_resumed, params_done)


def test_stage_model_fields_become_model_overrides_and_bad_stages_fail():
  spec = stages_spec(_config())
  first, second, _ = spec.points
  assert first.after is None and second.after == "stage-1"
  assert second.overrides["model_overrides.rope"]["rope_theta"] == 40000.0
  assert "model.rope.rope_theta" not in second.overrides
  name, config = largest_stage(_config())
  assert (name, config.data.seq_len, config.model.rope.rope_theta) == ("stage-3", 64, 40000.0)
  with pytest.raises(ConfigError, match=r"stages\[0\] sets 'init_from'"):
    stages_spec(_config(({"init_from": "/x"},)))
  with pytest.raises(ConfigError, match=r"stages\[1\] is 3; each stage is a dict"):
    stages_spec(_config((STAGES[0], 3)))
  with pytest.raises(ConfigError, match="point 'stage-2': override train.stepz"):
    run_stages(_config((STAGES[0], {"train.stepz": 2})), "/nonexistent/never-created")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~40 s: two processes and six stage compiles
def test_sigkill_in_stage_2_resumes_stage_2_from_its_checkpoint(tmp_path):
  """The README's recipe command, killed with SIGKILL in stage 2, then run again: stage 1 is
  not rerun, stage 2 resumes from its newest checkpoint, and the chain finishes."""
  workdir = tmp_path / "lwm"
  command = [sys.executable, "scripts/train.py", "--config", "configs/recipes/lwm.py:smoke"]
  command += ["--workdir", str(workdir)]
  stage1, stage2 = workdir / "stage-1", workdir / "stage-2"
  # One CPU device, as a laptop has (conftest gives this process 8); the session's flags.
  env = dict(os.environ, XLA_FLAGS=os.environ.get("LCJAX_TEST_XLA_FLAGS", ""))
  with open(tmp_path / "killed.log", "w") as log:
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      # orbax renames a step's folder into place once it is complete (lcjax Checkpointer).
      deadline = time.monotonic() + 300
      while not (stage2 / "checkpoints" / "1").is_dir():
        assert run.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
        assert time.monotonic() < deadline, "stage 2 wrote no checkpoint in 300 s"
        time.sleep(0.002)
      run.send_signal(signal.SIGKILL)
    finally:
      run.kill()
      run.wait()
  assert run.returncode == -signal.SIGKILL
  assert (stage1 / "sweep_point.json").exists()
  assert not (stage2 / "sweep_point.json").exists(), "killed after stage 2 had finished"
  finished_stage1 = (stage1 / "sweep_point.json").stat().st_mtime_ns
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "sweep: 1 of 5 points already finished" in rerun.stdout
  assert f"resumed from {stage2 / 'checkpoints'}/1" in rerun.stdout
  assert " stage-1 (train" not in rerun.stdout  # stage 1 never ran again
  _, second = stage_configs(load_config("configs/recipes/lwm.py:smoke"))[1]
  resumed = f"seq_len {second.data.seq_len}, batch {second.train.batch_size}; steps 1->"
  assert resumed in rerun.stdout  # stage 2 went on from its step 1
  assert (stage1 / "sweep_point.json").stat().st_mtime_ns == finished_stage1
  for k in range(1, 6):
    assert (workdir / f"stage-{k}" / "sweep_point.json").exists(), k
  assert "eval/ppl@64/trained" in open(workdir / "results.csv").read()
