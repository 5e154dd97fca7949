"""The Mamba-2 state-capacity study (Chen et al. 2024, "Stuffed Mamba"): smoke run and pieces."""

import json
import os

import numpy as np
import pytest

from lcjax.config import load_config
from lcjax.data import build_tokenizer
from lcjax.eval.state_capacity import (
  max_length_at,
  passkey_training_batch,
  run_state_capacity_study,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  return load_config(f"configs/mamba2_state_capacity.py:{arg}")


def test_training_rows_weight_only_the_answer_digits():
  tokenizer = build_tokenizer(dict(kind="byte"))
  tokens, targets, weights = passkey_training_batch(
    tokenizer, np.random.default_rng(0), batch=3, length=300
  )
  assert tokens.shape == targets.shape == weights.shape == (3, 300)
  np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
  for b in range(3):
    answer = tokenizer.decode(targets[b][weights[b] > 0])
    assert len(answer) == 5 and answer.isdigit()
    assert f"The pass key is {answer}." in tokenizer.decode(tokens[b])
    assert tokenizer.decode(tokens[b]).endswith(f"The pass key is {answer}")


def test_max_length_at_needs_every_shorter_length():
  assert max_length_at([256, 512, 1024], [1.0, 0.95, 0.5]) == 512
  assert max_length_at([256, 512, 1024], [1.0, 0.5, 1.0]) == 256
  assert max_length_at([256, 512], [0.5, 1.0]) == 0


# The README's study command runs this same smoke study in `make test`
# (tests/test_readme_commands.py checks it writes its JSON); this checks the outputs in
# detail, a second end-to-end run of the same grid.
@pytest.mark.slow
def test_smoke_study_writes_table_json_and_plots(tmp_path):
  config = _config("smoke")
  assert tuple(_config("runlocal").study.d_states) == (4, 16, 64)
  out = run_state_capacity_study(config, str(tmp_path))
  with open(tmp_path / "eval" / "state_capacity.json") as f:
    saved = json.load(f)
  assert saved["results"] == json.loads(json.dumps(out["results"]))
  rows = saved["results"]
  assert [(r["d_state"], r["train_length"]) for r in rows] == [(2, 256), (4, 256)]
  L = config.model.num_layers
  for r in rows:
    assert r["lengths"] == [256]  # 0.5x (128 tokens) is below the shortest prompt: dropped
    assert len(r["accuracy"]) == 1 and 0.0 <= r["accuracy"][0] <= 1.0
    K = len(r["state_norms"]["positions"])
    assert K >= 4 and np.asarray(r["state_norms"]["max_abs"]).shape == (L, K)
    assert np.all(np.isfinite(r["state_norms"]["mean_norm"]))
  (mit,) = saved["mitigations"]
  assert mit["d_state"] == 4 and set(mit["state_norms"]) == {
    "none",
    "m1_forget_more",
    "m1_remember_less",
    "m2_state_norm",
    "m3_window",
  }
  for name in ("accuracy", "max_length", "state_norms"):
    assert os.path.getsize(tmp_path / "plots" / f"state_capacity_{name}.png") > 1000
