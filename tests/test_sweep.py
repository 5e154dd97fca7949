"""scripts/sweep.py and lcjax.sweep: points from a config, order, skip, resume, results."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lcjax.config import ConfigError
from lcjax.sweep import load_sweep, print_commands, run_sweep
from lcjax.sweep.points import Point, order_points, point_config, with_dependencies
from lcjax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A three-point sweep at the suite's smallest training size (8 rows: one per test
# device): a pretrain, an eval-only RoPE swap of it (PI x2) and a short fine-tune from
# it at twice the length.
_SWEEP_CONFIG = """
from lcjax.config import parse_arg
from lcjax.train.config import base_config

ROPE = dict(rope_type="default", rope_theta=10000.0, max_position_embeddings=64)
PI2 = dict(rope_type="linear", rope_theta=10000.0, factor=2.0, max_position_embeddings=128)
PI2_OVERRIDES = {"model_overrides.rope": PI2, "model_overrides.max_position_embeddings": 128}


def get_config(arg=None):
  arg = parse_arg(arg, steps=4)
  c = base_config()
  c.model.update(vocab_size=384, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 mlp_dim=64, max_position_embeddings=64, rope=ROPE, dtype="float32")
  c.data.seq_len = 64
  c.train.update(steps=arg.steps, batch_size=8, lr=1e-3, warmup_steps=1, log_every=2)
  c.checkpoint.update(every_steps=2, keep=3, async_save=False)
  c.eval.update(every_steps=0, ppl_lengths=(64, 128), ppl_max_documents=1,
                ppl_max_tokens_per_document=513)
  c.attention.update(impl="reference")
  return c


def sweep(add, arg=None):
  add("ft", after="pretrain", **{"train.steps": 2, "data.seq_len": 128, **PI2_OVERRIDES})
  add("pretrain")
  add("pi2", after="pretrain", eval_only=True, **PI2_OVERRIDES)
  EXTRA


def metrics(arg=None):
  return ["eval/ppl@*/trained"]


def plots(arg=None):
  return [dict(file="ppl.png", metric="eval/ppl@{x}/trained", xlabel="tokens")]
"""


def _write_sweep(directory, extra: str = "pass") -> str:
  path = os.path.join(directory, "tiny_sweep.py")
  with open(path, "w") as f:
    f.write(_SWEEP_CONFIG.replace("EXTRA", extra))
  return path


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """(spec, sweep_dir, first run's result) of the tiny sweep, run once for the module."""
  root = tmp_path_factory.mktemp("sweep")
  spec = load_sweep(_write_sweep(str(root)))
  sweep_dir = str(root / "out")
  result = run_sweep(spec, sweep_dir)
  return spec, sweep_dir, result


def test_points_run_in_dependency_order_and_results_are_gathered(finished_sweep):
  spec, sweep_dir, result = finished_sweep
  assert [p.name for p in spec.points] == ["pretrain", "ft", "pi2"]
  assert result["ran"] == ["pretrain", "ft", "pi2"]
  with open(os.path.join(sweep_dir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["pretrain", "ft", "pi2"]
  for row in rows:
    assert row["status"] == "done"
    assert float(row["eval/ppl@64/trained"]) > 1.0
    assert float(row["eval/ppl@128/trained"]) > 1.0
  assert "model_overrides.rope=" in rows[2]["overrides"]
  table = open(os.path.join(sweep_dir, "results.md")).read()
  assert "| pi2 |" in table and "after pretrain, eval only" in table
  assert os.path.getsize(os.path.join(sweep_dir, "plots", "ppl.png")) > 1000
  # The fine-tune started from the pretrain's weights, at its own length and RoPE.
  ft_config = json.load(open(os.path.join(sweep_dir, "ft", "config.json")))
  assert ft_config["init_from"] == os.path.abspath(os.path.join(sweep_dir, "pretrain"))
  assert ft_config["data"]["seq_len"] == 128
  ft_model = json.load(open(os.path.join(sweep_dir, "ft", "model_config.json")))
  assert ft_model["rope"]["rope_type"] == "linear"


def test_eval_only_point_differs_from_its_checkpoint_only_by_rope(finished_sweep):
  spec, sweep_dir, _ = finished_sweep
  rows = {r["point"]: r for r in csv.DictReader(open(os.path.join(sweep_dir, "results.csv")))}
  # PI x2 on the same weights changes perplexity at the trained length, and trains nothing.
  assert rows["pi2"]["eval/ppl@64/trained"] != rows["pretrain"]["eval/ppl@64/trained"]
  assert not os.path.exists(os.path.join(sweep_dir, "pi2", "checkpoints"))


def test_rerun_of_a_finished_sweep_trains_nothing(finished_sweep):
  spec, sweep_dir, _ = finished_sweep
  metrics = os.path.join(sweep_dir, "pretrain", "metrics.jsonl")
  before = open(metrics).read()
  again = run_sweep(spec, sweep_dir)
  assert again["ran"] == [] and again["skipped"] == ["pretrain", "ft", "pi2"]
  assert open(metrics).read() == before


def test_print_commands_are_valid_train_and_eval_commands(finished_sweep, tmp_path, capsys):
  spec, sweep_dir, _ = finished_sweep
  print_commands(spec, sweep_dir, list(spec.points))
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("python scripts/train.py --config ")
  assert "--sweep_point ft" in lines[1] and lines[1].endswith("# after pretrain")
  assert "scripts/eval.py" in lines[2] and "--config.init_from=" in lines[2]
  # The fine-tune's and the eval-only point's printed commands, run as printed (into other
  # folders), measure what the runner measured.
  rows = {r["point"]: r for r in csv.DictReader(open(os.path.join(sweep_dir, "results.csv")))}
  env = dict(os.environ, XLA_FLAGS=os.environ.get("LCJAX_TEST_XLA_FLAGS", ""))
  for point, line in (("ft", lines[1]), ("pi2", lines[2])):
    command = line.split("  #")[0].split()
    workdir = str(tmp_path / f"{point}_again")
    command[command.index("--workdir") + 1] = workdir
    proc = subprocess.run(
      [sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    ppl = {k: v for row in logged for k, v in row.items() if k.startswith("eval/ppl@")}
    expected = float(rows[point]["eval/ppl@64/trained"])
    assert ppl["eval/ppl@64/trained"] == pytest.approx(expected, rel=1e-5), point


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path, capsys):
  spec = load_sweep(_write_sweep(str(tmp_path)) + ":steps=4")
  sweep_dir = str(tmp_path / "out")
  # As if killed after step 2: the pretrain's own run folder holds a step-2 checkpoint.
  half = point_config(spec, spec.point("pretrain"), sweep_dir=sweep_dir)
  half.train.steps = 2
  train(half, os.path.join(sweep_dir, "pretrain"))
  result = run_sweep(spec, sweep_dir, only=["pretrain"])
  out = capsys.readouterr().out
  assert result["ran"] == ["pretrain"]
  assert "resumed from" in out and "/pretrain/checkpoints/2" in out
  steps = sorted(int(d) for d in os.listdir(os.path.join(sweep_dir, "pretrain", "checkpoints")))
  assert steps[-1] == 4


def test_a_typo_fails_before_anything_runs_naming_the_point(tmp_path):
  path = _write_sweep(str(tmp_path), 'add("bad", after="pretrain", **{"train.stepz": 3})')
  sweep_dir = str(tmp_path / "out")
  with pytest.raises(ConfigError, match=r"point 'bad'.*stepz"):
    run_sweep(load_sweep(path), sweep_dir)
  assert not os.path.exists(sweep_dir)
  # A bad RoPE type in model_overrides is caught against the model the point inits from.
  path = _write_sweep(
    str(tmp_path),
    'add("bad2", after="pretrain", **{"model_overrides.rope": {"rope_type": "yarnn"}})',
  )
  with pytest.raises(ConfigError, match=r"point 'bad2'.*yarnn"):
    run_sweep(load_sweep(path), sweep_dir)
  assert not os.path.exists(sweep_dir)


def test_order_points_puts_dependencies_first_and_rejects_cycles():
  points = [Point("c", {}, after="b"), Point("a", {}), Point("b", {}, after="a")]
  assert [p.name for p in order_points(points)] == ["a", "b", "c"]
  with pytest.raises(ConfigError, match="cycle"):
    order_points([Point("a", {}, after="b"), Point("b", {}, after="a")])
  with pytest.raises(ConfigError, match="names no point"):
    order_points([Point("a", {}, after="zzz")])


def test_only_adds_what_a_point_starts_from(tmp_path):
  spec = load_sweep(_write_sweep(str(tmp_path)))
  assert [p.name for p in with_dependencies(spec, ["ft"])] == ["pretrain", "ft"]
  with pytest.raises(ConfigError, match="no point 'nope'"):
    with_dependencies(spec, ["nope"])


def test_sweep_config_errors_are_one_sentence(tmp_path):
  path = os.path.join(tmp_path, "dup.py")
  with open(path, "w") as f:
    f.write(
      textwrap.dedent(
        """
        def get_config(arg=None):
          return None
        def sweep(add, arg=None):
          add("a")
          add("a")
        """
      )
    )
  with pytest.raises(ConfigError, match="added twice"):
    load_sweep(path)
