"""configs/rope_extrapolation.py: its points, and a same-seed rerun reproducing its table."""

import csv
import os

import pytest

from lcjax.sweep import load_sweep, run_sweep, validate_points
from lcjax.sweep.points import with_dependencies

SPEC = "configs/rope_extrapolation.py:smoke"


def test_every_extending_rope_type_and_factor_is_a_point(tmp_path):
  spec = load_sweep(SPEC)
  names = set(spec.names())
  for kind in ("pi", "ntk", "hfdyn", "yarn", "llama3", "longrope", "giraffe", "eabf"):
    for s in (2, 4, 8, 16):
      assert f"{kind}_s{s}" in names
      assert spec.point(f"{kind}_s{s}").eval_only
  for kind in ("direct", "pi4", "yarn4", "abf", "eabf"):
    assert not spec.point(f"ft_{kind}").eval_only
  assert {"pretrain", "dynamic"} <= names
  # Every point's config (rope dicts, lengths, the fine-tunes' 4x rows) validates.
  configs = validate_points(spec, str(tmp_path), list(spec.points))
  assert configs["ft_yarn4"].data.seq_len == 4 * configs["pretrain"].data.seq_len
  assert configs["pretrain"].eval.ppl_protocol == "truncated"


def _rows(directory):
  with open(os.path.join(directory, "results.csv")) as f:
    return {r["point"]: r for r in csv.DictReader(f)}


def test_same_seed_rerun_reproduces_the_table(tmp_path):
  spec = load_sweep(SPEC)
  only = ["yarn_s4"]  # the pretrain and one untuned point: training and evaluation
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  run_sweep(spec, first, only=only)
  run_sweep(spec, second, only=only)
  a, b = _rows(first), _rows(second)
  points = [p.name for p in with_dependencies(spec, only)]
  columns = [c for c in a["pretrain"] if c.startswith("eval/ppl@")]
  assert len(columns) == 3
  for point in points:
    for column in columns:
      assert float(b[point][column]) == pytest.approx(float(a[point][column]), rel=1e-3)
