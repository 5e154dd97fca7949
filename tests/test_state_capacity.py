"""The Mamba-2 state-capacity study (MQAR capacity vs. N, then token passkey) as a sweep config.

configs/mamba2_state_capacity.py runs through scripts/sweep.py (no loop of its own): its
points, the evaluations it relies on (`lcjax.eval.mqar`: MQAR accuracy and capacity,
token-passkey accuracy; eval.state_norms), a model trained for seconds that beats chance
on MQAR, and an end-to-end run of its `smoke` arg.
"""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.config import ConfigError, load_config
from lcjax.data import build_tokenizer
from lcjax.data.synthetic import token_passkey_vocabulary
from lcjax.eval.mqar import mqar_accuracy, recall_capacity, token_passkey_accuracy
from lcjax.eval.passkey import max_length_at
from lcjax.eval.state_capacity import _doubling_windows, state_norm_evaluation, state_norm_prompt
from lcjax.models import build_model, mamba2_config
from lcjax.sweep import load_sweep
from lcjax.sweep.runner import validate_points
from lcjax.train import train
from lcjax.train.config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mamba2_state_capacity.py")
MITIGATIONS = ("m1_forget_more", "m1_remember_less", "m2_state_norm", "m3_window")
VOCAB = 384


def test_max_length_at_needs_every_shorter_length():
  assert max_length_at([256, 512, 1024], [1.0, 0.95, 0.5]) == 512
  assert max_length_at([256, 512, 1024], [1.0, 0.5, 1.0]) == 256
  assert max_length_at([256, 512], [0.5, 1.0]) == 0
  assert max_length_at([256, 512], [0.5, 0.6], threshold=0.5) == 512
  assert recall_capacity([2, 4, 8, 16], [0.99, 0.85, 0.79, 0.9]) == 4  # 80% by default
  assert recall_capacity([2, 4], [0.7, 0.9]) == 0


def test_the_config_is_a_sweep_that_runs_nothing_itself(tmp_path):
  source = open(CONFIG).read()
  assert "__main__" not in source and "argparse" not in source
  spec = load_sweep(f"{CONFIG}:runlocal")
  train_points = [p for p in spec.points if not p.eval_only]
  Ns = (4, 16, 64)  # notes/studies.md §4's CPU grid; the full grid has 4, 8, 16, 32, 64
  names = [f"mqar_N{n}" for n in Ns] + ["mqar_attention"] + [f"passkey_N{n}" for n in Ns]
  assert [p.name for p in train_points] == names
  for n in Ns:
    mqar = spec.point(f"mqar_N{n}").overrides
    assert mqar["model.d_state"] == n and mqar["data.seq_len"] == 64
    passkey = spec.point(f"passkey_N{n}").overrides
    assert passkey["data.synthetic.task"] == "token_passkey" and passkey["data.seq_len"] == 128
    assert passkey["eval.token_passkey.lengths"] == (32, 64, 128, 256, 512, 1024, 2048)
    assert passkey["eval.state_norms.length"] == 16 * 128
    # the T/4 -> T curriculum over the first half of the rows
    steps, batch = passkey["train.steps"], passkey["train.batch_size"]
    assert passkey["data.synthetic.curriculum_rows"] == steps * batch // 2
  control = spec.point("mqar_attention").overrides
  attention = control["model"]  # Zoology's attention baseline: a short conv, then NoPE attention
  assert attention["family"] == "llama" and attention["d_model"] == 64
  assert attention["num_heads"] * attention["head_dim"] == 64
  assert tuple(attention["layer_types"]) == ("mamba2", "full_attention")
  assert attention["rope"]["rope_type"] == "nope" and attention["mamba"]["d_state"] == 4
  assert control["train.lr"] == 3e-3 and control["train.steps"] == 1500
  for n in Ns:  # passkey starts from the MQAR model of the same N
    assert spec.point(f"passkey_N{n}").after == f"mqar_N{n}"
    assert spec.point(f"passkey_N{n}").overrides["model.d_state"] == n  # what init_from holds
  assert all(spec.point(name).after is None for name in names[:4])
  after = {p.name: p for p in spec.points if p.eval_only}
  assert sorted(after) == sorted(f"passkey_N64_{m}" for m in MITIGATIONS)
  assert all(p.after == "passkey_N64" for p in after.values())
  assert after["passkey_N64_m3_window"].overrides["model_overrides.state_window"] == 128
  config = load_config(f"{CONFIG}:runlocal")
  assert config.data.synthetic.task == "mqar" and config.model.family == "mamba2"
  assert config.eval.mqar.enabled and config.eval.mqar.threshold == 0.8
  assert tuple(config.eval.mqar.pairs) == (2, 4, 8, 16, 32, 64)
  validate_points(spec, str(tmp_path), list(spec.points))  # every point's config is valid
  full = load_sweep(CONFIG)  # the full grid: five N, and M4 (continual training at 2T)
  assert [p.name for p in full.points][:6] == [f"mqar_N{n}" for n in (4, 8, 16, 32, 64)] + [
    "mqar_attention"
  ]
  m4 = full.point("passkey_N64_m4_train512")  # the full grid trains passkey at T = 256
  assert m4.after == "passkey_N64" and not m4.eval_only and m4.overrides["data.seq_len"] == 512
  mqar_only = load_sweep(f"{CONFIG}:runlocal,passkey=False")
  assert [p.name for p in mqar_only.points] == names[:4]


def test_eval_settings_are_checked_before_training():
  passkey = dict(load_sweep(f"{CONFIG}:smoke").point("passkey_N4").overrides)
  config = load_config(f"{CONFIG}:smoke", passkey)
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
  config = load_config(f"{CONFIG}:smoke", {"eval.mqar.pairs": (2, 65)})
  with pytest.raises(ConfigError, match=r"eval.mqar.pairs=\(2, 65\) must be ints in \[1, min"):
    validate_config(config)
  config = load_config(f"{CONFIG}:smoke", {"eval.mqar.threshold": 80.0})
  with pytest.raises(ConfigError, match=r"eval.mqar.threshold=80.0 must be an accuracy"):
    validate_config(config)
  config = load_config(f"{CONFIG}:smoke", {"data.synthetic.task": "passkey"})
  config.data.synthetic.update(max_pairs=None, num_queries=None)
  config.data.seq_len = 300
  with pytest.raises(ConfigError, match=r"eval.mqar scores a model trained on .*'mqar'"):
    validate_config(config)
  config = load_config(f"{CONFIG}:smoke", {**passkey, "eval.token_passkey.lengths": (4, 32)})
  with pytest.raises(ConfigError, match=r"eval.token_passkey.lengths=\(4, 32\) must be ints >= 8"):
    validate_config(config)


def test_state_norm_evaluation_reports_doubling_windows():
  positions = [64, 128, 192, 256, 320, 384, 448, 512]
  assert _doubling_windows(positions, 100) == {100: [0], 200: [1, 2], 400: [3, 4, 5]}
  assert _doubling_windows(positions, 128) == {128: [0, 1], 256: [2, 3], 512: [4, 5, 6, 7]}
  cfg = mamba2_config(
    vocab_size=VOCAB, d_model=32, num_layers=2, head_dim=16, d_state=4, chunk_size=32
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
  # Models trained on token_passkey are measured on a token_passkey example of the length.
  data = load_config(
    f"{CONFIG}:smoke", dict(load_sweep(f"{CONFIG}:smoke").point("passkey_N4").overrides)
  ).data
  prompt = state_norm_prompt(tokenizer, 100, data_config=data)
  vocab = token_passkey_vocabulary(64)
  assert prompt.size == 100 and (prompt == vocab["mark"]).sum() == 2
  assert prompt.max() < vocab["size"]


class RecallOracle(nnx.Module):
  """Perfect associative recall: predicts the token after the first earlier copy of the input."""

  def __call__(self, tokens_BT, **unused):
    del unused
    T = tokens_BT.shape[1]
    earlier_BTS = (tokens_BT[:, :, None] == tokens_BT[:, None, :]) & jnp.tril(
      jnp.ones((T, T), bool), -1
    )
    first_BT = jnp.argmax(earlier_BTS, axis=-1)
    following_BT = jnp.take_along_axis(tokens_BT, jnp.minimum(first_BT + 1, T - 1), axis=1)
    return jax.nn.one_hot(jnp.where(earlier_BTS.any(-1), following_BT, 0), VOCAB)


class WindowedPasskeyOracle(nnx.Module):
  """Copies the key after the needle's MARK when the question's is <= `window` tokens later."""

  def __init__(self, window: int):
    self.window = window

  def __call__(self, tokens_BT, **unused):
    del unused
    vocab = token_passkey_vocabulary(64)
    T = tokens_BT.shape[1]
    key_B1 = jnp.argmax(tokens_BT == vocab["mark"], axis=1)[:, None]
    query_B1 = T - 1 - jnp.argmax(tokens_BT[:, ::-1] == vocab["mark"], axis=1)[:, None]
    t_BT = jnp.arange(T)[None]
    source_BT = jnp.clip(key_B1 + 1 + t_BT - query_B1, 0, T - 1)
    copied_BT = jnp.take_along_axis(tokens_BT, source_BT, axis=1)
    remembers_BT = (t_BT >= query_B1) & (query_B1 - key_B1 <= self.window)
    return jax.nn.one_hot(jnp.where(remembers_BT, copied_BT, vocab["filler_start"]), VOCAB)


class ConstantValue(nnx.Module):
  def __call__(self, tokens_BT, **unused):
    del unused
    return jax.nn.one_hot(jnp.full(tokens_BT.shape, 64), VOCAB)  # always the first value


def test_recall_evaluations_score_oracles_exactly():
  kwargs = dict(pairs=[2, 16, 64], rows=8, num_queries=16, num_keys=64, num_values=64)
  perfect = mqar_accuracy(RecallOracle(), **kwargs)
  assert perfect["accuracy"] == [1.0, 1.0, 1.0] and perfect["chance"] == 1 / 64
  assert recall_capacity(perfect["pairs"], perfect["accuracy"]) == 64
  constant = mqar_accuracy(ConstantValue(), **kwargs, batch_size=3)  # a padded last chunk
  assert max(constant["accuracy"]) < 0.1  # right only where value 64 is asked
  # The needle-to-query distance is D + 1 + (1 - depth)·filler: at depth 0.9 it is < 20 up to
  # 128 tokens, at depth 0.1 only at 16 tokens (filler 10-12 -> distance <= 14).
  result = token_passkey_accuracy(
    WindowedPasskeyOracle(window=20),
    lengths=[16, 64, 128],
    depths=[0.1, 0.9],
    trials=4,
    seed=0,
  )
  assert result["accuracy"] == [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
  means = [sum(a) / 2 for a in result["accuracy"]]
  assert max_length_at(result["lengths"], means, 0.9) == 16


def test_a_model_trained_for_seconds_beats_chance_at_two_pairs(tmp_path):
  overrides = {
    "train.steps": 400,
    "train.batch_size": 16,
    "train.lr": 1e-2,
    "train.warmup_steps": 5,
    "train.log_every": 400,
    "data.synthetic.max_pairs": 2,
    "data.synthetic.num_queries": 4,
    "data.seq_len": 12,
    "train.loss_chunk": 12,
    "eval.every_steps": 0,
    "eval.mqar.pairs": (2,),
    "eval.mqar.rows": 64,
    "checkpoint.every_steps": 400,
  }
  config = load_config(f"{CONFIG}:smoke", overrides)
  train(config, str(tmp_path))
  result = json.load(open(tmp_path / "eval" / "mqar.json"))
  assert result["pairs"] == [2] and result["chance"] == 1 / 64
  # Chance is 1/64; measured 0.53 (the model has learnt to answer with a value of the row).
  assert result["accuracy"][0] > 0.25, result
  assert os.path.getsize(tmp_path / "plots" / "loss_curve.png") > 1000


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
  names = ["mqar_N4", "mqar_attention", "passkey_N4", *[f"passkey_N4_{m}" for m in MITIGATIONS]]
  assert f"sweep: {len(names)} run, 0 skipped" in proc.stdout
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(names)
  for name in ("mqar_N4", "mqar_attention"):
    row = rows[name]
    assert row["status"] == "done" and float(row["eval/loss"]) > 0
    assert all(0.0 <= float(row[f"eval/mqar@{K}"]) <= 1.0 for K in (2, 4))
    assert int(float(row["eval/mqar_capacity"])) in (0, 2, 4)
  assert (
    float(rows["mqar_N4"]["eval/d_state"]) == 4 and rows["mqar_attention"]["eval/d_state"] == ""
  )
  assert rows["mqar_N4"]["eval/mqar_capacity_vs_d_state@4"] == rows["mqar_N4"]["eval/mqar_capacity"]
  for name in names[2:]:
    row = rows[name]
    assert row["status"] == "done"
    assert float(row["eval/state_norm_max@32"]) > 0 and float(row["eval/state_abs_max"]) > 0
    assert all(0.0 <= float(row[f"eval/token_passkey@{n}"]) <= 1.0 for n in (16, 32, 64))
    assert int(float(row["eval/token_passkey_max_length"])) in (0, 16, 32, 64)
  for m in MITIGATIONS:
    row = rows[f"passkey_N4_{m}"]
    assert row["kind"] == "eval" and row["after"] == "passkey_N4"
    assert not os.path.exists(os.path.join(sweep_dir, f"passkey_N4_{m}", "checkpoints"))
  model = json.load(open(os.path.join(sweep_dir, "passkey_N4_m2_state_norm", "model_config.json")))
  assert model["d_state"] == 4 and model["state_norm_max"] == 128.0
  norms = json.load(open(os.path.join(sweep_dir, "passkey_N4", "eval", "state_norms.json")))
  assert norms["train_length"] == 32 and norms["positions"][-1] == 64
  data = json.load(open(os.path.join(sweep_dir, "passkey_N4", "config.json")))["data"]
  assert data["synthetic"]["task"] == "token_passkey"
  for plot in (
    "mqar_accuracy_vs_pairs.png",
    "mqar_capacity_vs_d_state.png",
    "token_passkey_vs_length.png",
    "token_passkey_max_length_vs_d_state.png",
    "state_norm_vs_position.png",
  ):
    assert os.path.getsize(os.path.join(sweep_dir, "plots", plot)) > 1000
  for point, plot in (("mqar_N4", "loss_curve.png"), ("passkey_N4", "state_norms.png")):
    assert os.path.getsize(os.path.join(sweep_dir, point, "plots", plot)) > 1000
