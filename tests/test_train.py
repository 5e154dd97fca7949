"""End-to-end training: exact resume after SIGKILL, SIGTERM, bad input, divergence."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.config import ConfigError, load_config
from lcjax.train import TrainingDiverged, train
from lcjax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")


def _quickstart(arg="tiny"):
  return load_config(f"configs/quickstart.py:{arg}")


# Command-line overrides shared by the subprocess tests: a very small, fast run.
TINY_FLAGS = [
  "--config.data.seq_len=64",
  "--config.model.max_position_embeddings=64",
  "--config.model.rope.max_position_embeddings=64",
  "--config.model.d_model=32",
  "--config.model.mlp_dim=64",
  "--config.train.batch_size=4",
  "--config.train.log_every=1",
  "--config.eval.ppl_lengths=()",
  "--config.eval.every_steps=0",
]


def _run(workdir, *flags, env=None, wait=True):
  cmd = [
    sys.executable,
    TRAIN,
    f"--config={ROOT}/configs/quickstart.py:tiny",
    f"--workdir={workdir}",
  ]
  # One device (no forced device count), keeping the suite's compile flags (conftest.py).
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": os.environ.get("LCJAX_TEST_XLA_FLAGS", ""),
    **(env or {}),
  }
  proc = subprocess.Popen(
    [*cmd, *TINY_FLAGS, *flags],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _losses(workdir):
  return {
    r["step"]: r["loss"]
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if "loss" in r
  }


def _wait_for(path, proc, timeout=120):
  t = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, "training ended before the checkpoint appeared"
    assert time.time() - t < timeout
    time.sleep(0.02)


def test_exact_resume_after_sigkill(tmp_path):
  """k steps, SIGKILL, rerun == N steps straight, for every step after the resume."""
  flags = ["--config.train.steps=40", "--config.checkpoint.every_steps=8"]
  code, out = _run(tmp_path / "straight", *flags)
  assert code == 0, out
  straight = _losses(tmp_path / "straight")
  assert sorted(straight) == list(range(1, 41))

  proc = _run(tmp_path / "killed", *flags, wait=False)
  _wait_for(tmp_path / "killed" / "checkpoints" / "16", proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_losses(tmp_path / "killed"))
  assert killed_at < 40, "the kill came too late to test anything"

  code, out = _run(tmp_path / "killed", *flags)
  assert code == 0, out
  assert "resumed from" in out
  resumed = _losses(tmp_path / "killed")
  assert sorted(resumed) == list(range(1, 41))  # each step logged exactly once
  assert resumed == straight  # bit-identical losses, before and after the resume


def test_sigterm_saves_then_exits_cleanly(tmp_path):
  proc = _run(
    tmp_path, "--config.train.steps=100000", "--config.checkpoint.every_steps=5", wait=False
  )
  _wait_for(tmp_path / "checkpoints" / "5", proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM: saved step" in out
  saved = int(out.split("SIGTERM: saved step ")[1].split(";")[0])
  assert os.path.isdir(tmp_path / "checkpoints" / str(saved))
  assert max(_losses(tmp_path)) == saved


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--config.train.stepz=3", "error: --config.train.stepz: config.train has no field 'stepz'"),
    ("--config.model.rope.rope_type=yarnn", "error: model.rope: rope type 'yarnn' is unknown"),
  ],
  ids=["unknown-field", "rope-typo"],
)
def test_config_mistakes_are_one_error_line(tmp_path, flag, message):
  """scripts/train.py: a misspelt field or a bad value is one `error:` line, exit 2."""
  code, out = _run(tmp_path, flag)
  assert code == 2, out
  assert message in out and "Traceback" not in out, out
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def _script_main(name):
  """The main() of scripts/NAME.py, called in this process."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _tiny_inprocess(tmp_path, **train):
  c = _quickstart()
  c.data.seq_len = 32
  c.model.update(max_position_embeddings=32, d_model=32, mlp_dim=64)
  c.model.rope.max_position_embeddings = 32
  c.train.update(batch_size=8, log_every=1, **train)  # 8 fake devices: 8 rows
  c.eval.update(every_steps=0, ppl_lengths=())
  return c


def test_mesh_batch_mismatch_is_one_clear_error(tmp_path):
  c = _tiny_inprocess(tmp_path, steps=2)
  c.train.batch_size = 4
  with pytest.raises(ConfigError, match=r"batch size 4 is not divisible by data\*fsdp=8"):
    train(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")  # failed before writing anything


def test_missing_data_path_and_empty_corpus(tmp_path):
  c = _tiny_inprocess(tmp_path, steps=2)
  c.data.source = dict(kind="text", path=str(tmp_path / "nope" / "*.txt"))
  with pytest.raises(FileNotFoundError, match="nope"):
    train(c, str(tmp_path / "run"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_bytes(b"")
  c.data.source = dict(kind="text", path=str(tmp_path / "empty"), validation_fraction=0.0)
  with pytest.raises(ValueError, match="empty"):
    train(c, str(tmp_path / "run"))


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  c = _tiny_inprocess(tmp_path, steps=8)
  c.checkpoint.update(every_steps=4, keep=3, async_save=False)
  train(c, str(tmp_path))
  first = _losses(tmp_path)
  for path in glob.glob(str(tmp_path / "checkpoints" / "8" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  train(c, str(tmp_path))  # the same command again
  assert "does not restore" in caplog.text
  assert glob.glob(str(tmp_path / "checkpoints" / "corrupt-8-*"))  # kept aside, not deleted
  again = _losses(tmp_path)
  assert again == first  # steps 5..8 recomputed from checkpoint 4, identically
  assert sorted(os.listdir(tmp_path / "checkpoints"))[:2] == ["4", "8"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _tiny_inprocess(
    tmp_path, steps=20, lr=1e30, warmup_steps=0, schedule="constant", grad_clip_norm=0.0
  )
  c.checkpoint.update(every_steps=1, async_save=False)
  with pytest.raises(TrainingDiverged, match=r"at step \d+; the last good checkpoint"):
    train(c, str(tmp_path))
  losses = _losses(tmp_path)
  bad = max(losses)
  assert not np.isfinite(float(losses[bad]))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps and max(steps) == bad - 1  # nothing saved at or after the bad step
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["lr"] == 1e30


def test_hugging_face_checkpoint_in_train_longer_and_out(tmp_path, capsys):
  """The README's continual-pretraining loop end to end.

  A transformers checkpoint written here → `init_from` with ABF as a model override (the
  first loss equals the loaded weights' loss) → two checkpoints of training → the run
  folder exported with `scripts/convert_hf.py --to hf --src RUN` → transformers loads
  it, and its logits equal lcjax's on the trained weights (and differ from the start).
  """
  import torch
  import transformers

  from lcjax import data as lcdata
  from lcjax.interop.hf import load_pretrained
  from lcjax.train.loss import cross_entropy_reference
  from lcjax.train.run_model import load_run_params, model_from_params

  hf = transformers.LlamaConfig(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    rope_parameters=dict(rope_type="default", rope_theta=1e4), initializer_range=0.2,
  )  # fmt: skip
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf")

  abf = dict(rope_type="abf", rope_theta=5e5, max_position_embeddings=32)
  c = _tiny_inprocess(tmp_path, steps=2)
  c.init_from = str(tmp_path / "hf")
  c.model_overrides = dict(rope=abf)
  c.checkpoint.update(every_steps=1, async_save=False)
  train(c, str(tmp_path / "run"))
  first_loss = _losses(tmp_path / "run")[1]
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["model_overrides"]["rope"]["rope_type"] == "abf"

  loaded, cfg = load_pretrained(str(tmp_path / "hf"))
  cfg.rope = abf
  start = model_from_params(nnx.state(loaded, nnx.Param), cfg)
  batch = next(lcdata.make_train_iterator(c.data, batch_size=8, seed=c.train.seed))
  logits = start(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  nll, weight = cross_entropy_reference(
    logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_weights"])
  )
  np.testing.assert_allclose(first_loss, float(nll / weight), rtol=1e-5)

  convert = _script_main("convert_hf")
  out = tmp_path / "exported"
  assert convert(["--to", "hf", "--src", str(tmp_path / "run"), "--dst", str(out)]) == 0
  assert "checkpoints/2" in capsys.readouterr().out
  exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert exported.config.rope_parameters["rope_type"] == "default"  # ABF = default + theta
  assert exported.config.rope_parameters["rope_theta"] == 5e5
  tokens = np.random.default_rng(0).integers(0, 384, size=(2, 32))
  with torch.no_grad():
    theirs = exported(torch.as_tensor(tokens)).logits.numpy()
  params, trained_cfg, step = load_run_params(str(tmp_path / "run"))
  assert step == 2
  ours = np.asarray(model_from_params(params, trained_cfg)(jnp.asarray(tokens)))
  np.testing.assert_allclose(theirs, ours, atol=1e-4)  # fp32 logits, as test_hf_interop
  assert np.abs(ours - np.asarray(start(jnp.asarray(tokens)))).max() > 1e-3  # it trained

  # --step picks an earlier checkpoint; a step that was not saved is one clear error.
  assert (
    convert(["--to", "hf", "--src", str(tmp_path / "run"), "--dst", str(out), "--step", "1"]) == 0
  )
  assert "checkpoints/1" in capsys.readouterr().out
  assert (
    convert(["--to", "hf", "--src", str(tmp_path / "run"), "--dst", str(out), "--step", "7"]) == 2
  )
  assert "no checkpoint of step 7; it has steps [1, 2]" in capsys.readouterr().err


def test_mixture_decomposition_and_passkey_through_the_trainer(tmp_path):
  """The data recipes and the end-of-run evaluations work through train() unchanged."""
  text = tmp_path / "short"
  text.mkdir()
  for i in range(20):
    (text / f"{i}.txt").write_text(f"short document number {i}. " * (i + 2))
  c = _tiny_inprocess(tmp_path, steps=3)
  c.data.mixture = [
    dict(source=dict(kind="stdlib"), weight=0.7, name="long"),
    dict(
      source=dict(kind="text", path=str(text), validation_fraction=0.0), weight=0.3, name="short"
    ),
  ]
  c.eval.passkey = dict(enabled=True, lengths=(300,), depths=(0.0, 1.0), trials=2)
  c.eval.ppl_lengths = (32, 64)
  c.eval.ppl_max_documents = 2
  c.eval.ppl_max_tokens_per_document = 129  # 4 windows of 32, 2 of 64 per document
  metrics = train(c, str(tmp_path / "mix"))
  assert "data/sources/short/documents" in metrics
  for path in ("eval/passkey.json", "plots/passkey_depth_length.png", "plots/ppl_vs_length.png"):
    assert os.path.getsize(tmp_path / "mix" / path) > 0
  rows = read_metrics(str(tmp_path / "mix" / "metrics.jsonl"))
  assert any("eval/passkey@300" in r for r in rows) and any(
    "eval/ppl@64/trained" in r for r in rows
  )
  with open(tmp_path / "mix" / "eval" / "ppl_vs_length.json") as f:
    trained = json.load(f)["trained"]
  assert [(r["context_len"], r["windows"]) for r in trained] == [(32, 8), (64, 4)]

  c = _tiny_inprocess(tmp_path, steps=4)
  c.data.decomposition = dict(min_log2=3, max_log2=5, tokens_per_batch=256, curriculum="grow")
  train(c, str(tmp_path / "dd"))
  assert sorted(_losses(tmp_path / "dd")) == [1, 2, 3, 4]


# `make test` trains Mamba-2 through lcjax.train's optimizer and step in the README's
# state-capacity smoke run (tests/test_readme_commands.py); this runs the whole loop.
@pytest.mark.slow
def test_mamba2_config_trains_through_the_same_loop(tmp_path):
  from lcjax.models import mamba2_config

  c = _tiny_inprocess(tmp_path, steps=3)
  c.model = mamba2_config(
    vocab_size=384, d_model=32, num_layers=2, d_state=8, head_dim=8, chunk_size=16, dtype="float32"
  )
  c.eval.update(ppl_lengths=(32, 64), ppl_max_documents=2)
  train(c, str(tmp_path))
  losses = _losses(tmp_path)
  assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
  with open(tmp_path / "eval" / "ppl_vs_length.json") as f:
    assert list(json.load(f)) == ["trained"]  # no RoPE variants for an SSM
