"""The mesh, the logical-axis rules, layouts and the parallel-config validation (8 CPU devices)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from lcjax.config import ConfigError
from lcjax.parallel import (
  LAYOUTS,
  LOGICAL_RULES,
  MESH_AXES,
  apply_layout,
  from_layout,
  inverse_permutation,
  logical_sharding,
  logical_to_spec,
  make_mesh,
  mesh_shape,
  permutation,
  to_layout,
  validate_parallel_config,
)
from lcjax.parallel.mesh import fit_spec


def test_make_mesh_axes_sizes_and_types():
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1, context=2)))
  assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "tensor", "context")
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=1, context=2)
  assert mesh.axis_types == (AxisType.Auto,) * 4
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  # Missing axes are 1; -1 may sit on any axis; explicit devices.
  assert dict(make_mesh(dict(context=-1)).shape) == dict(data=1, fsdp=1, tensor=1, context=8)
  assert make_mesh(dict(data=2, tensor=-1), devices=jax.devices()[:4]).shape["tensor"] == 2


@pytest.mark.parametrize(
  "config, message",
  [
    (dict(data=-1, context=-1), "mesh.data and mesh.context are both -1; at most one axis"),
    (dict(data=3, context=-1), "3 does not divide 8; change the mesh sizes"),
    (dict(data=4, context=4), "needs 16 devices but only 8 are available"),
    (dict(data=2, context=2), "uses 4 of the 8 devices; set one axis to -1"),
    (dict(data=0, context=-1), r"mesh.data=0 must be a positive integer or -1"),
    (dict(data=-1, context=2.0), r"mesh.context=2.0 must be a positive integer or -1"),
    (dict(data=-1, sequence=2), "mesh.sequence is not a mesh axis; use the axes"),
  ],
)
def test_mesh_errors(config, message):
  with pytest.raises(ConfigError, match=message):
    make_mesh(config)


def test_mesh_shape_without_devices():
  """Sizes resolve against any device count (e.g. a pod topology from a CPU host)."""
  assert mesh_shape(dict(fsdp=-1, tensor=4, context=8), 256) == dict(
    data=1, fsdp=8, tensor=4, context=8
  )


def test_fit_spec_keeps_the_longest_dividing_prefix():
  sizes = dict(data=1, fsdp=2, tensor=1, context=4)
  spec = PartitionSpec(("fsdp", "context"), "tensor")
  assert fit_spec(spec, (16, 6), sizes) == PartitionSpec(("fsdp", "context"), None)
  assert fit_spec(spec, (6, 6), sizes) == PartitionSpec("fsdp", None)  # 8 does not divide 6
  assert fit_spec(spec, (3, 6), sizes) == PartitionSpec(None, None)
  # Axes of size 1 are dropped rather than kept as no-op names.
  assert fit_spec(spec, (16, 6), dict(sizes, fsdp=1)) == PartitionSpec("context", None)


def test_logical_rules():
  assert logical_to_spec(("batch", "activation_length", "activation_embed")) == PartitionSpec(
    ("data", "fsdp"), "context", None
  )
  # Parameters shard their model dimension over fsdp and context (issue #15: one row on
  # 8 chips has fsdp 1, and the weights must still be split 8 ways).
  fc = ("fsdp", "context")
  assert logical_to_spec(("embed", "mlp")) == PartitionSpec(fc, "tensor")
  assert logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", fc)
  assert logical_to_spec(("embed", "heads", "head_dim")) == PartitionSpec(fc, "tensor", None)
  assert logical_to_spec(("layers", "embed", "mlp")) == PartitionSpec(None, fc, "tensor")
  assert logical_to_spec(("kv_heads", None)) == PartitionSpec("tensor", None)
  # A mesh axis is used once per spec: "embed" after "batch" finds fsdp taken.
  assert logical_to_spec(("batch", "embed")) == PartitionSpec(("data", "fsdp"), "context")
  for name, target in LOGICAL_RULES.items():
    axes = () if target is None else (target,) if isinstance(target, str) else target
    assert set(axes) <= set(MESH_AXES), name
  with pytest.raises(ValueError, match="logical axis 'sequence' has no rule; known names"):
    logical_to_spec(("batch", "sequence"))
  mesh = make_mesh(dict(data=-1, context=2))
  sharding = logical_sharding(mesh, ("batch", "activation_length"))
  x = jax.device_put(np.zeros((4, 16), np.float32), sharding)
  assert x.addressable_shards[0].data.shape == (1, 8)


PARALLEL = dict(context_strategy="ring", layout="zigzag")


def test_validate_parallel_config_accepts_and_returns_sizes():
  mesh = dict(data=-1, fsdp=1, tensor=1, context=8)
  sizes = validate_parallel_config(mesh, PARALLEL, seq_len=1024, batch_size=4)
  assert sizes == dict(data=1, fsdp=1, tensor=1, context=8)
  for layout in LAYOUTS:
    parallel = dict(context_strategy="all_gather", layout=layout)
    validate_parallel_config(mesh, parallel, seq_len=1024, batch_size=1)


@pytest.mark.parametrize(
  "mesh, parallel, seq_len, batch_size, message",
  [
    (
      dict(context=8),
      PARALLEL,
      1000,
      8,
      r"^sequence length 1000 is not divisible by 2\*context=16 needed by the zigzag layout; "
      r"change data.seq_len or mesh.context$",
    ),
    (
      dict(context=8),
      dict(PARALLEL, layout="striped"),
      1004,
      8,
      "sequence length 1004 is not divisible by context=8 needed by the striped layout",
    ),
    (
      dict(context=8),
      dict(PARALLEL, context_strategy="ulysses"),
      1024,
      8,
      r"parallel.context_strategy='ulysses' is not a strategy; use one of \('ring', 'all_gather'\)",
    ),
    (
      dict(context=8),
      dict(PARALLEL, layout="random"),
      1024,
      8,
      r"parallel.layout='random' is not a layout; use one of \('contiguous', 'zigzag', 'striped'\)",
    ),
    (dict(data=4, context=4), PARALLEL, 1024, 8, "needs 16 devices but only 8 are available"),
    (
      dict(data=2, fsdp=2, context=2),
      PARALLEL,
      1024,
      6,
      "batch size 6 is not divisible by data\\*fsdp=4; change train.batch_size",
    ),
  ],
)
def test_validate_parallel_config_errors(mesh, parallel, seq_len, batch_size, message):
  with pytest.raises(ConfigError, match=message):
    validate_parallel_config(mesh, parallel, seq_len=seq_len, batch_size=batch_size)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("W", [1, 2, 4, 8])
def test_layout_round_trip(layout, W):
  T = 32
  perm = permutation(T, W, layout)
  inv = inverse_permutation(T, W, layout)
  assert sorted(perm.tolist()) == list(range(T))
  np.testing.assert_array_equal(perm[inv], np.arange(T))
  x = np.random.default_rng(0).normal(size=(2, T, 3)).astype(np.float32)
  np.testing.assert_array_equal(from_layout(to_layout(x, W, layout), W, layout), x)
  x_jax = jax.numpy.asarray(x)
  np.testing.assert_array_equal(from_layout(to_layout(x_jax, W, layout), W, layout), x)


def test_layout_device_chunks():
  """Which original tokens each of W devices holds (slots [r·T/W, (r+1)·T/W))."""
  T, W = 16, 4
  zigzag = permutation(T, W, "zigzag").reshape(W, -1)  # 2W chunks of 2: r and 2W-1-r
  np.testing.assert_array_equal(zigzag[0], [0, 1, 14, 15])
  np.testing.assert_array_equal(zigzag[1], [2, 3, 12, 13])
  np.testing.assert_array_equal(zigzag[3], [6, 7, 8, 9])
  striped = permutation(T, W, "striped").reshape(W, -1)  # token i on device i mod W
  for r in range(W):
    assert all(i % W == r for i in striped[r]), striped[r]
  np.testing.assert_array_equal(striped[1], [1, 5, 9, 13])
  np.testing.assert_array_equal(permutation(T, W, "contiguous"), np.arange(T))


def test_apply_layout_permutes_the_batch_together():
  T, W = 16, 2
  rng = np.random.default_rng(0)
  batch = dict(
    tokens=rng.integers(0, 100, (2, T)),
    targets=rng.integers(0, 100, (2, T)),
    segment_ids=np.repeat([[1] * 5 + [2] * 11], 2, 0),
    positions=np.repeat([list(range(5)) + list(range(11))], 2, 0),  # per-document RoPE
    loss_weights=rng.random((2, T)).astype(np.float32),
  )
  laid = apply_layout(batch, W, "zigzag")
  perm = permutation(T, W, "zigzag")
  for key, x in batch.items():
    np.testing.assert_array_equal(laid[key], x[:, perm], err_msg=key)
  np.testing.assert_array_equal(laid["token_index"], np.broadcast_to(perm, (2, T)))
  # Without RoPE positions, they default to the global index (positions stay global).
  laid = apply_layout(dict(tokens=batch["tokens"]), W, "striped")
  np.testing.assert_array_equal(laid["positions"], laid["token_index"])
  with pytest.raises(ConfigError, match="sequence length 16 is not divisible by 2\\*context=32"):
    apply_layout(batch, 16, "zigzag")
