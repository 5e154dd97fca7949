"""The Mamba-2 state-capacity study (Chen et al. 2024, "Stuffed Mamba") as a sweep config.

configs/mamba2_state_capacity.py runs through scripts/sweep.py (no loop of its own): its
points, the evaluation hooks it relies on (eval/passkey_max_length, eval.state_norms) and
an end-to-end run of its `smoke` arg.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from lcjax.config import ConfigError, load_config
from lcjax.data import build_tokenizer
from lcjax.eval.passkey import max_length_at
from lcjax.eval.state_capacity import _doubling_windows, state_norm_evaluation
from lcjax.models import build_model, mamba2_config
from lcjax.sweep import load_sweep
from lcjax.train.config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mamba2_state_capacity.py")
MITIGATIONS = ("m1_forget_more", "m1_remember_less", "m2_state_norm", "m3_window")


def test_max_length_at_needs_every_shorter_length():
  assert max_length_at([256, 512, 1024], [1.0, 0.95, 0.5]) == 512
  assert max_length_at([256, 512, 1024], [1.0, 0.5, 1.0]) == 256
  assert max_length_at([256, 512], [0.5, 1.0]) == 0
  assert max_length_at([256, 512], [0.5, 0.6], threshold=0.5) == 512


def test_the_config_is_a_sweep_that_runs_nothing_itself():
  source = open(CONFIG).read()
  assert "__main__" not in source and "argparse" not in source
  spec = load_sweep(f"{CONFIG}:runlocal")
  train = [p for p in spec.points if not p.eval_only and p.after is None]
  assert [p.name for p in train] == ["T320_N4", "T320_N16", "T320_N64"]
  for point, n in zip(train, (4, 16, 64), strict=True):
    assert point.overrides["model.d_state"] == n and point.overrides["data.seq_len"] == 320
    assert point.overrides["eval.passkey.lengths"] == (320, 640, 1280, 2560, 5120)
  after = {p.name: p for p in spec.points if p.after is not None}
  assert sorted(after) == sorted([f"T320_N64_{m}" for m in MITIGATIONS] + ["T320_N64_m4_train640"])
  assert all(p.after == "T320_N64" for p in after.values())
  assert all(after[f"T320_N64_{m}"].eval_only for m in MITIGATIONS)
  m4 = after["T320_N64_m4_train640"]
  assert not m4.eval_only and m4.overrides["data.seq_len"] == 640
  assert after["T320_N64_m3_window"].overrides["eval.passkey.enabled"] is False
  config = load_config(f"{CONFIG}:runlocal")
  assert config.data.synthetic.task == "passkey" and config.model.family == "mamba2"
  assert config.eval.state_norms.enabled and config.eval.passkey.enabled
  full = load_sweep(CONFIG)  # the full grid: 5 N x 2 T, mitigations after each T's N=64
  assert len([p for p in full.points if p.after is None]) == 10
  assert {p.after for p in full.points if p.after} == {"T512_N64", "T1024_N64"}


def test_eval_settings_are_checked_before_training():
  config = load_config(f"{CONFIG}:smoke")
  with config.unlocked():
    config.eval.state_norms.every = 10_000
  with pytest.raises(ConfigError, match=r"eval.state_norms.every=10000 must be in \[1, "):
    validate_config(config)
  config = load_config(f"{CONFIG}:smoke")
  config.eval.passkey.threshold = 1.5
  with pytest.raises(ConfigError, match=r"eval.passkey.threshold=1.5 must be an accuracy"):
    validate_config(config)
  config = load_config("configs/quickstart.py:tiny")
  config.eval.state_norms.enabled = True
  with pytest.raises(ConfigError, match=r"eval.state_norms measures Mamba-2 .* 'llama'"):
    validate_config(config)


def test_state_norm_evaluation_reports_doubling_windows():
  positions = [64, 128, 192, 256, 320, 384, 448, 512]
  assert _doubling_windows(positions, 100) == {100: [0], 200: [1, 2], 400: [3, 4, 5]}
  assert _doubling_windows(positions, 128) == {128: [0, 1], 256: [2, 3], 512: [4, 5, 6, 7]}
  cfg = mamba2_config(
    vocab_size=384, d_model=32, num_layers=2, head_dim=16, d_state=4, chunk_size=32
  )
  model = build_model(cfg, rngs=nnx.Rngs(0))
  tokenizer = build_tokenizer({"kind": "byte"})
  summary, lines = state_norm_evaluation(model, tokenizer, length=512, every=64, train_length=256)
  assert summary["positions"] == list(range(64, 513, 64))
  assert np.asarray(summary["max_abs"]).shape == (2, 8)
  assert sorted(lines) == [
    "eval/state_abs_max",
    "eval/state_norm_max",
    "eval/state_norm_max@256",
    "eval/state_norm_max@512",
  ]
  max_norm = np.max(summary["max_norm"], axis=0)
  assert lines["eval/state_norm_max"] == pytest.approx(max_norm.max())
  assert lines["eval/state_norm_max@256"] == pytest.approx(max_norm[:4].max())
  assert lines["eval/state_norm_max@512"] == pytest.approx(max_norm[4:].max())
  assert all(np.isfinite(v) and v > 0 for v in lines.values())


# The README's study command runs this same smoke sweep as a subprocess in `make test`
# (tests/test_readme_commands.py checks it writes results.csv); this checks what the
# points wrote in detail.
@pytest.mark.slow
def test_smoke_sweep_trains_the_grid_and_evaluates_the_mitigations(tmp_path):
  sweep_dir = str(tmp_path / "sc")
  # As the README runs it, on one CPU device (the suite's 8 fake devices would need 8 rows).
  env = dict(os.environ, XLA_FLAGS=os.environ.get("LCJAX_TEST_XLA_FLAGS", ""))
  command = ["scripts/sweep.py", "--config", f"{CONFIG}:smoke", "--workdir", sweep_dir]
  proc = subprocess.run(
    [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  names = ["T256_N2", "T256_N4", *[f"T256_N4_{m}" for m in MITIGATIONS], "T256_N4_m4_train512"]
  assert f"sweep: {len(names)} run, 0 skipped" in proc.stdout
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(names)
  for name, row in rows.items():
    assert row["status"] == "done"
    assert float(row["eval/state_norm_max"]) > 0
    assert float(row["eval/state_abs_max"]) > 0
    if name.endswith("m3_window"):  # generate has no windowed recurrence: norms only
      assert row["eval/passkey@256"] == "" and row["eval/passkey_max_length"] == ""
    else:
      assert 0.0 <= float(row["eval/passkey@256"]) <= 1.0
      assert int(float(row["eval/passkey_max_length"])) in (0, 256)
  for name in names[:2]:  # training points log the validation answer loss
    assert float(rows[name]["eval/loss"]) > 0
    assert rows[name]["kind"] == "train" and rows[name]["after"] == ""
  for m in MITIGATIONS:
    row = rows[f"T256_N4_{m}"]
    assert row["kind"] == "eval" and row["after"] == "T256_N4"
    assert not os.path.exists(os.path.join(sweep_dir, f"T256_N4_{m}", "checkpoints"))
  model = json.load(open(os.path.join(sweep_dir, "T256_N4_m2_state_norm", "model_config.json")))
  assert model["d_state"] == 4 and model["state_norm_max"] == 0.5
  norms = json.load(open(os.path.join(sweep_dir, "T256_N2", "eval", "state_norms.json")))
  assert norms["train_length"] == 256 and norms["positions"][-1] == 512
  data = json.load(open(os.path.join(sweep_dir, "T256_N2", "config.json")))["data"]
  assert data["synthetic"]["task"] == "passkey"
  for plot in ("passkey_vs_length_T256.png", "state_norm_vs_position_T256.png"):
    assert os.path.getsize(os.path.join(sweep_dir, "plots", plot)) > 1000
  assert os.path.getsize(os.path.join(sweep_dir, "T256_N2", "plots", "state_norms.png")) > 1000
