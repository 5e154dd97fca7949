"""The device mesh, the logical-axis rules and the validation of `config.mesh`/`config.parallel`.

mesh = make_mesh(config.mesh)                      # axes ('data', 'fsdp', 'tensor', 'context')
x_sharding = logical_sharding(mesh, ("batch", "activation_length", "activation_embed"))

The mesh has four named axes, in this order: `data` (pure data parallelism), `fsdp`
(data parallelism with parameters sharded over it, ZeRO-3 style), `tensor` (heads,
MLP and vocabulary split, Megatron style) and `context` (the sequence split of
context parallelism: ring attention, Liu et al. 2023). The last axis varies fastest
over the device list, so on TPU the `context` ring runs between ICI neighbours.

Model code never names mesh axes. It names *logical* axes ("batch", "embed",
"heads", ...) and `LOGICAL_RULES`, one table, maps them to mesh axes (MaxText's
logical axis rules): a new parallelism is a new rule, not an edit across the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.config import ConfigError
from lcjax.parallel.layouts import check_layout

__all__ = [
  "MESH_AXES",
  "BATCH_AXES",
  "CONTEXT_STRATEGIES",
  "LOGICAL_RULES",
  "mesh_shape",
  "make_mesh",
  "logical_to_spec",
  "logical_sharding",
  "fit_spec",
  "constrain",
  "mesh_axis_size",
  "ACTIVATION_BTD",
  "ACTIVATION_BTF",
  "ACTIVATION_BTHD",
  "ACTIVATION_BTKD",
  "validate_parallel_config",
]

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")  # the axes the rows of a global batch are split over
CONTEXT_STRATEGIES = ("ring", "all_gather")

# Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated).
# Parameters: "embed" is sharded over fsdp *and* context (ZeRO-3 over every chip that
# holds different tokens: with one 1M-token row on 8 chips fsdp is 1, and parameters
# sharded over fsdp alone would put the whole fp32 model + AdamW state, ~90 GiB for
# Llama-3-8B, on every chip; MaxText shards parameters over its sequence axis the same
# way). The per-head/MLP/vocabulary dimensions are tensor-sharded, so a [embed, mlp]
# kernel is split over all three. Activations: rows over the batch axes, the sequence
# over `context`, heads over `tensor`; their model dimension ("activation_embed") stays
# whole, as it is contracted by every matmul. Stacked layers (`model.scan_layers`) put
# the layer axis first and keep it whole ("layers"), so a scan step reads one slice.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
  # Parameters.
  "embed": ("fsdp", "context"),
  "vocab": "tensor",
  "mlp": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "norm": None,
  "layers": None,
  # Activations.
  "batch": BATCH_AXES,
  "activation_length": "context",
  "activation_embed": None,
  "activation_heads": "tensor",
  "activation_kv_heads": "tensor",
  "activation_mlp": "tensor",
  "activation_vocab": "tensor",
  "activation_head_dim": None,
}


def _mesh_sizes(mesh_config) -> dict[str, int]:
  """The four requested sizes (missing axes are 1), validated but with -1 unresolved."""
  if not isinstance(mesh_config, Mapping) and not hasattr(mesh_config, "keys"):
    raise ConfigError(f"mesh config must be a dict of axis sizes, got {type(mesh_config).__name__}")
  unknown = sorted(set(mesh_config.keys()) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh.{unknown[0]} is not a mesh axis; use the axes {MESH_AXES}")
  sizes = {}
  for axis in MESH_AXES:
    size = mesh_config[axis] if axis in mesh_config else 1
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis}={size!r} must be a positive integer or -1 (the rest)")
    sizes[axis] = size
  rest = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if len(rest) > 1:
    raise ConfigError(
      f"mesh.{rest[0]} and mesh.{rest[1]} are both -1; at most one axis can take the rest"
    )
  return sizes


def mesh_shape(mesh_config, num_devices: int | None = None) -> dict[str, int]:
  """Resolves the sizes of `mesh_config` against `num_devices` (default all devices).

  Returns {'data': ..., 'fsdp': ..., 'tensor': ..., 'context': ...} whose product is
  `num_devices`; -1 becomes the devices left over by the other axes. Raises a
  `ConfigError` when the sizes cannot multiply to the device count.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = _mesh_sizes(mesh_config)
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = " x ".join(f"{axis}={sizes[axis]}" for axis in MESH_AXES)
  rest = [axis for axis in MESH_AXES if sizes[axis] == -1]
  if rest:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh {described} cannot cover {num_devices} devices because {fixed} does not divide "
        f"{num_devices}; change the mesh sizes so their product divides the device count"
      )
    sizes[rest[0]] = num_devices // fixed
  elif fixed > num_devices:
    raise ConfigError(
      f"mesh {described} needs {fixed} devices but only {num_devices} are available; shrink "
      "the mesh or set one axis to -1"
    )
  elif fixed != num_devices:
    raise ConfigError(
      f"mesh {described} uses {fixed} of the {num_devices} devices; set one axis to -1 or "
      f"make the sizes multiply to {num_devices} (or pass devices= to make_mesh)"
    )
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor', 'context') mesh over `devices` (default all devices).

  `mesh_config` maps axis names to sizes (a dict or ConfigDict, e.g. `config.mesh`;
  missing axes are 1, -1 is "the rest"). Device order comes from `jax.make_mesh`,
  which follows the physical topology on TPU.

  Axis types are `AxisType.Auto` on purpose: lcjax shards with NamedSharding
  constraints and `jax.shard_map` and lets the compiler propagate shardings through
  the rest of the model (the GSPMD behaviour the model and trainer are written for).
  With Explicit axes (the `jax.make_mesh` default in current JAX) every array's type
  carries its sharding, so operations that mix shardings (e.g. an einsum of two
  arrays sharded on the same axis) raise until each is resharded by hand.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    # A logical axis that is no product of whole physical torus axes (e.g. 8 on a 4x4x4
    # v5p slice): split physical axes rather than refuse the mesh.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
  names: Sequence[str | None], rules: Mapping[str, str | tuple[str, ...] | None] | None = None
) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions have these logical names.

  `None` (or a name the rules map to None) leaves a dimension replicated. A mesh axis
  is used at most once per spec: a later dimension whose rule repeats an axis an
  earlier one took keeps only its unused axes (e.g. ("batch", "embed") gives
  P(('data', 'fsdp'), None)). Unknown names raise, listing the known ones.
  """
  rules = LOGICAL_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule; known names: {sorted(rules)}")
    target = rules[name]
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(axis for axis in axes if axis not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules=None) -> NamedSharding:
  """`NamedSharding(mesh, logical_to_spec(names, rules))`."""
  return NamedSharding(mesh, logical_to_spec(names, rules))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh_shape: Mapping[str, int]):
  """`spec` with each dimension sharded over the longest prefix of its axes that divides it.

  ('fsdp', 'context') on a dimension 8 does not divide keeps 'fsdp' alone when fsdp
  divides it, and replicates the dimension when not even the first axis does (tiny test
  models on 8 devices). Axes of size 1 are dropped.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if mesh_shape[a] > 1)
    while names and dim % math.prod(mesh_shape[a] for a in names):
      names = names[:-1]
    fitted.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*fitted)


# Logical names of the activations the model constrains (MaxText's activation rules).
ACTIVATION_BTD = ("batch", "activation_length", "activation_embed")
ACTIVATION_BTF = ("batch", "activation_length", "activation_mlp")
ACTIVATION_BTHD = ("batch", "activation_length", "activation_heads", "activation_head_dim")
ACTIVATION_BTKD = ("batch", "activation_length", "activation_kv_heads", "activation_head_dim")


def mesh_axis_size(axis: str) -> int:
  """Size of `axis` in the mesh set with `jax.set_mesh` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins `x`'s sharding to its logical axis names under the mesh set with `jax.set_mesh`.

  Without such constraints GSPMD is free to satisfy `x @ W` with an FSDP-sharded W by
  gathering the activations over 'fsdp' rather than the weights, so every chip held
  MLP intermediates for all rows (issue #15; MaxText constrains activations the same
  way). A dimension its mesh axes do not divide stays replicated. Without a mesh, or
  on a one-device mesh, `x` is returned as is, so single-device programs are unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  spec = fit_spec(logical_to_spec(names), x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def validate_parallel_config(
  mesh_config,
  parallel_config,
  *,
  seq_len: int,
  batch_size: int,
  num_devices: int | None = None,
) -> dict[str, int]:
  """Checks `config.mesh` and `config.parallel` before tracing; returns the mesh sizes.

  Raises a `ConfigError` naming the field and the fix for: mesh sizes that do not
  multiply to the device count (or a mesh larger than it), an unknown
  `parallel.context_strategy` or `parallel.layout`, a sequence length the layout
  cannot split over `context` (contiguous and striped need `context | seq_len`,
  zigzag `2*context | seq_len`) and a batch not divisible by data*fsdp.
  """
  sizes = mesh_shape(mesh_config, num_devices)
  strategy = parallel_config.get("context_strategy", "ring")
  if strategy not in CONTEXT_STRATEGIES:
    raise ConfigError(
      f"parallel.context_strategy={strategy!r} is not a strategy; use one of {CONTEXT_STRATEGIES}"
    )
  check_layout(seq_len, sizes["context"], parallel_config.get("layout", "contiguous"))
  rows = sizes["data"] * sizes["fsdp"]
  if batch_size % rows:
    raise ConfigError(
      f"batch size {batch_size} is not divisible by data*fsdp={rows}; change train.batch_size "
      "or mesh.data/mesh.fsdp"
    )
  return sizes
