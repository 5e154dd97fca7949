"""Ahead-of-time compilation of the train step for TPU topologies from this CPU host (libtpu)."""

import os
import re

import pytest

from lcjax.config import ConfigError, load_config
from lcjax.train import aot
from lcjax.train.aot import check_host_memory, compile_train_step, format_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("libtpu", reason="libtpu is part of the test extra on Linux x86-64 only")


def _quickstart(arg):
  return load_config(f"configs/quickstart.py:{arg}")


# `make test` also compiles the README's pod command (fsdp 8 x context 8 ring on v5p:4x4x4, a
# tiny model) in tests/test_readme_commands.py; this checks the report's fields.
def test_ring_attention_train_step_compiles_for_v5p_with_pallas(monkeypatch, tmp_path):
  compiled, lower = [], aot.lower_train_step
  monkeypatch.setenv(aot.DUMP_ENV, str(tmp_path / "xla"))

  def lower_and_keep(config, devices):
    out = lower(config, devices)
    compiled.append(out[0])
    return out

  monkeypatch.setattr(aot, "lower_train_step", lower_and_keep)
  c = _quickstart("tiny")
  c.mesh.update(data=1, context=8)
  c.attention.impl = "auto"
  # model.remat=offload keeps each layer's input in pinned_host memory (lcjax.models.remat).
  c.model.remat = "offload"
  report = compile_train_step(c, "v5p:2x2x2")
  assert report["devices"] == 8 and report["device_kind"].startswith("TPU v5")
  assert report["mesh"]["context"] == 8
  assert 0 < report["per_device_bytes"] < report["hbm_bytes"]
  assert report["flops_per_device"] > 0 and report["model_flops_per_device"] > 0
  # Traced on this CPU host, "auto" still resolves for the TPU: the Pallas kernels, lowered
  # through Mosaic (a tpu_custom_call), not run in Pallas' interpret mode.
  assert report["attention_impl"] == "pallas"
  hlo = compiled[0].as_text()
  assert "tpu_custom_call" in hlo, "the Pallas kernels were traced in interpret mode, not Mosaic"
  # The kernels' per-row statistics (lse, Delta) reach HBM as rows [B, H, 1, T]: as columns
  # [B, H, T, 1] TPU tiles the last two dims by (8, 128), 128x their size (2 GiB for
  # f32[1, 32, 131072, 1]; README "Checking a pod run"). Here: f32[8, 4, 32, 1] columns.
  columns = re.findall(r"f32\[\d+,\d+,\d+,1\]\{3,2,1,0:T\(8,128\)", hlo)
  assert not columns, f"lane-padded [.., T, 1] float32 arrays in HBM: {columns[:3]}"
  # v5p:2x2x2 spans 2 hosts of 4 chips, each holding its chips' offloaded layer inputs.
  assert report["devices_per_host"] == 4
  assert 0 < report["host_bytes_per_device"] * 4 == report["host_bytes_per_host"]
  # Over the per-host budget, the same report is one clear error (compile_train_step's check).
  with pytest.raises(
    ConfigError, match=r"GiB of host memory per host \(4 devices x .*host_memory_budget_gib=1e-09"
  ):
    check_host_memory({**report, "host_budget_bytes": 1e-9 * aot.GiB})
  text = format_report(report)
  assert "v5p:2x2x2" in text and "attention impl: pallas" in text
  # LCJAX_XLA_DUMP_TO: XLA's buffer-level memory report of the compiled step.
  reports = list((tmp_path / "xla").glob("*jit_step*memory-usage-report.txt"))
  assert reports and "Total bytes" in reports[0].read_text()
  assert "host (pinned_host) per device: 0.00 GiB; per host (4 devices)" in text


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
