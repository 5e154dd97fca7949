"""The AOT compile's target platform and host-memory check, without libtpu.

`impl="auto"` follows `target_platform` (the platform being compiled for), so a TPU
topology traced on a CPU host gets the Pallas kernels (tests/test_aot.py compiles one),
while a compile for CPU devices keeps the pure-JAX blockwise attention.
"""

import jax
import pytest

from lcjax.attention import MaskSpec, registry
from lcjax.attention.inputs import AttentionOptions
from lcjax.attention.registry import AttentionImpl, resolve_impl, target_platform
from lcjax.config import ConfigError, load_config
from lcjax.train.aot import GiB, check_host_memory, compile_train_step
from lcjax.train.config import validate_config


def test_auto_resolves_for_the_target_platform():
  assert resolve_impl("auto") == "blockwise"  # this CPU host
  with target_platform("tpu"):
    assert resolve_impl("auto") == "pallas"
    assert resolve_impl("auto", platform="cpu") == "blockwise"  # an explicit platform wins
    assert resolve_impl("blockwise") == "blockwise"  # a named impl is never changed
    with target_platform("cpu"):
      assert resolve_impl("auto") == "blockwise"
    assert resolve_impl("auto") == "pallas"
  assert resolve_impl("auto") == "blockwise"


def test_pallas_blocks_fit_triton_shared_memory_on_gpu(monkeypatch):
  """On a GPU (or a compile for one) the kernels get at most 64-blocks: 128-blocks at
  head_dim 128 exceed an H200's shared memory (scripts/gpu_check.py); TPU keeps its own."""
  seen = []
  monkeypatch.setattr(registry, "pallas_with_lse", lambda q, k, v, i, opts, **kw: seen.append(opts))
  q = jax.numpy.zeros((1, 256, 2, 128))
  for platform, want in (("gpu", (64, 64)), ("cuda", (64, 64)), ("tpu", (512, 128))):
    with target_platform(platform):
      opts = AttentionOptions(MaskSpec(), None, 512, 128)
      registry.IMPLS["pallas"].attention(q, q, q, None, opts)
    assert (seen[-1].block_q, seen[-1].block_kv) == want, platform


def test_a_compile_for_cpu_devices_keeps_blockwise(monkeypatch):
  def pallas_traced(*args, **kwargs):
    raise AssertionError("a compile for CPU devices traced the Pallas kernels")

  monkeypatch.setitem(
    registry.IMPLS, "pallas", AttentionImpl(pallas_traced, pallas_traced, pallas_traced)
  )
  c = load_config("configs/quickstart.py:tiny")
  c.attention.impl = "auto"
  c.model.num_layers = 1
  c.mesh.update(data=1)
  with target_platform("tpu"):  # the devices' own platform decides, not an outer block
    report = compile_train_step(c, devices=jax.devices()[:1])
  assert report["attention_impl"] == "blockwise"
  assert report["devices_per_host"] == 1 and report["host_bytes_per_device"] == 0


def _report(host_bytes_per_device, devices_per_host, budget_gib):
  return dict(
    host_bytes_per_device=host_bytes_per_device,
    devices_per_host=devices_per_host,
    host_bytes_per_host=host_bytes_per_device * devices_per_host,
    host_budget_bytes=budget_gib * GiB,
  )


def test_host_memory_over_the_budget_is_one_clear_error():
  check_host_memory(_report(100 * GiB, 4, 448.0))  # 400 GiB of a v5p host's 448: fits
  with pytest.raises(ConfigError, match=r"500\.0 GiB of host memory per host.*448.*offload"):
    check_host_memory(_report(125 * GiB, 4, 448.0))
  with pytest.raises(ConfigError, match="train.host_memory_budget_gib"):
    check_host_memory(_report(2, 1, 1e-9))


def test_host_memory_budget_must_be_positive():
  c = load_config("configs/quickstart.py:tiny")
  assert c.train.host_memory_budget_gib == 448.0
  c.train.host_memory_budget_gib = 0.0
  with pytest.raises(ConfigError, match="train.host_memory_budget_gib=0.0 must be positive"):
    validate_config(c, num_devices=1)


def test_scanned_offload_with_sharded_rows_is_refused_for_tpu_only():
  """libtpu 0.0.42 aborts the process on this combination; validation names the fix first."""
  c = load_config("configs/quickstart.py:tiny")
  c.model.remat = "offload"
  c.mesh.update(data=1, fsdp=2, context=4)
  c.train.batch_size = 2
  with pytest.raises(
    ConfigError, match=r"offload.* Pallas attention and rows sharded over mesh.data\*mesh.fsdp=2"
  ):
    validate_config(c, num_devices=8, platform="tpu")
  validate_config(c, num_devices=8, platform="cpu")  # XLA:CPU compiles it
  c.attention.impl = "blockwise"  # the pure-JAX attention compiles with sharded rows
  validate_config(c, num_devices=8, platform="tpu")
  c.attention.impl = "auto"
  c.model.scan_layers = False
  validate_config(c, num_devices=8, platform="tpu")
  c.model.scan_layers = None
  c.mesh.update(fsdp=1, context=8)
  c.train.batch_size = 1
  validate_config(c, num_devices=8, platform="tpu")  # one row per context group compiles
