"""configs/rope_extrapolation.py: its points, and a same-seed rerun reproducing its table."""

import csv
import os

import pytest

from lcjax.sweep import load_sweep, run_sweep, validate_points
from lcjax.sweep.points import with_dependencies

SPEC = "configs/rope_extrapolation.py:smoke"


@pytest.mark.parametrize("arg", ["runlocal", "smoke"])
def test_every_extending_rope_type_and_factor_is_a_point(tmp_path, arg):
  spec = load_sweep(f"configs/rope_extrapolation.py:{arg}")
  names = set(spec.names())
  # smoke keeps factor 4 of every method; the study has them all.
  factors = (4,) if arg == "smoke" else (2, 4, 8, 16)
  for kind in ("pi", "ntk", "hfdyn", "yarn", "llama3", "longrope", "giraffe", "eabf"):
    for s in (2, 4, 8, 16):
      assert (f"{kind}_s{s}" in names) == (s in factors)
      if s in factors:
        assert spec.point(f"{kind}_s{s}").eval_only
  tuned = ("yarn4", "eabf") if arg == "smoke" else ("direct", "pi4", "yarn4", "abf", "eabf")
  assert {n for n in names if n.startswith("ft_")} == {f"ft_{kind}" for kind in tuned}
  for kind in tuned:
    assert not spec.point(f"ft_{kind}").eval_only
  assert {"pretrain", "dynamic"} <= names
  if arg == "runlocal":  # its 4-row fine-tunes do not split over the suite's 8 devices
    return
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
