"""Ahead-of-time compilation of the train step for TPU topologies from this CPU host (libtpu)."""

import os

import pytest

from lcjax.config import ConfigError, load_config
from lcjax.train.aot import compile_train_step, format_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("libtpu", reason="libtpu is part of the test extra on Linux x86-64 only")


def _quickstart(arg):
  return load_config(f"configs/quickstart.py:{arg}")


# `make test` compiles the README's pod command (fsdp 8 x context 8 ring on v5p:4x4x4, a
# tiny model) in tests/test_readme_commands.py; this checks the report's fields.
@pytest.mark.slow
def test_ring_attention_train_step_compiles_for_v5p():
  c = _quickstart("tiny")
  c.mesh.update(data=1, context=8)
  report = compile_train_step(c, "v5p:2x2x2")
  assert report["devices"] == 8 and report["device_kind"].startswith("TPU v5")
  assert report["mesh"]["context"] == 8
  assert 0 < report["per_device_bytes"] < report["hbm_bytes"]
  assert report["flops_per_device"] > 0
  assert "v5p:2x2x2" in format_report(report)


def test_a_step_that_does_not_fit_is_one_clear_error():
  c = _quickstart("tiny")
  c.model.update(vocab_size=2**20, d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=128)
  c.mesh.update(data=1, fsdp=1, context=4)
  with pytest.raises(
    ConfigError, match=r"does not fit a TPU v5 lite|GiB per device but a TPU v5 lite"
  ):
    compile_train_step(c, "v5e:2x2")


def test_unknown_topology_is_one_clear_error():
  with pytest.raises(ConfigError, match="v9z:1x1"):
    compile_train_step(_quickstart("tiny"), "v9z:1x1")
