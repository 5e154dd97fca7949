"""Rotary position embeddings (RoPE) and a registry of context-extension types.

RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864, eq. 34) rotates each pair of query/key
features by `position * inv_freq_i`. lcjax uses Hugging Face's half-split layout (pairs `i` and
`i + D/2`, `rotate_half` in `transformers.models.llama.modeling_llama`), so HF Llama checkpoints
load without permuting q/k weights. This module holds the registry (`ROPE_TYPES`), validation,
the HF config round trip, `compute_inv_freq` and the rotation. The inverse-frequency rules of
the HF types follow transformers 5.24 `modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS`) and its
config semantics (`rope_hf_types`); lcjax additions (ABF, entropy-aware ABF, Giraffe
truncation, NoPE) are registered the same way (`rope_variants`). Angles are exact
(`angles`).

Typical use inside an attention layer:

  params = standardize_rope_parameters(hf_config_json)     # once, at config time
  cos_BTK, sin_BTK = cos_sin_for_positions(params, head_dim, positions_BT)   # exact angles
  q_BTHD, k_BTHD = apply_rope(q_BTHD, cos_BTK, sin_BTK), apply_rope(k_BTHD, cos_BTK, sin_BTK)
  scale_BT = query_scale(params, positions_BT)             # None for every type but 'eabf'
  if scale_BT is not None and query_scale_layers(params, num_layers)[layer]:
    q_BTHD = q_BTHD * scale_BT[:, :, None, None].astype(q_BTHD.dtype)

Partial rotary (`partial_rotary_factor < 1`): the rotary dimension is
`R = int(head_dim * partial_rotary_factor)`; `compute_inv_freq` computes the `R/2` frequencies of
the type and pads them with zeros up to `head_dim // 2` (zero frequency = identity rotation), so
the half-split rotation always spans the whole head and rotates pairs `(i, i + head_dim/2)` for
`i < R/2`. This is the layout of HF's `proportional` type (Gemma-style). It is NOT the layout of
GPT-NeoX/Phi-style partial rotary in HF, which rotates the first `R` features with pairs
`(i, i + R/2)`; importing such checkpoints needs a permutation of q/k features.
"""

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from lcjax.positional import angles
from lcjax.positional.angles import is_host_value

# transformers' `RotaryEmbeddingConfigMixin.default_theta`.
DEFAULT_ROPE_THETA = 10000.0

# rope_types for which HF standardization fills `original_max_position_embeddings`
# (`RotaryEmbeddingConfigMixin.standardize_rope_params`).
_HF_ORIGINAL_MAX_TYPES = ("llama3", "yarn", "longrope")

Params = Mapping[str, Any]
# (rope_parameters, head_dim, rotary_dim, seq_len) -> (inv_freq, attention_factor). inv_freq is a
# float64 numpy array when it does not depend on a traced seq_len, else a float32 jnp array; it
# holds rotary_dim // 2 entries (or head_dim // 2; compute_inv_freq pads with zeros).
InvFreqFn = Callable[[Params, int, int, Any], tuple[Any, float]]
# (rope_parameters, positions_BT) -> scale_BT, multiplied into the query after RoPE.
QueryScaleFn = Callable[[Params, jax.Array], jax.Array]
# (rope_parameters, num_layers) -> one flag per layer: whether that layer applies the scale.
QueryScaleLayersFn = Callable[[Params, int], tuple[bool, ...]]
# (rope_parameters, rope_type name, head_dim or None) -> None; raises ValueError.
CheckFn = Callable[[Params, str, int | None], None]


@dataclasses.dataclass(frozen=True)
class RopeType:
  """One registered RoPE variant.

  Attributes:
    inv_freq_fn: computes `(inv_freq, attention_factor)`; see `InvFreqFn`.
    required_keys: keys of `rope_parameters` that must be present and not None.
    positive_keys: keys that, when present, must be numbers > 0.
    check_fn: extra validation beyond required/positive keys; raises ValueError.
    query_scale_fn: optional per-position query multiplier applied after RoPE (see `query_scale`).
    query_scale_layers_fn: which layers apply `query_scale_fn` (see `query_scale_layers`);
      None: every layer.
    uses_seq_len: whether the frequencies depend on `seq_len` (dynamic, longrope); callers may
      skip computing `max(positions) + 1` when it is False.
    default_rope_theta: the base when neither the dict nor the HF config sets `rope_theta`
      (HF's 10,000; a type whose reference fixes another base says so here).
    exclusive_keys: keys only this type reads; validation rejects them under any other type, so
      a key meant for one type is never silently ignored by another.
  """

  inv_freq_fn: InvFreqFn
  required_keys: tuple[str, ...] = ("rope_theta",)
  positive_keys: tuple[str, ...] = ()
  check_fn: CheckFn | None = None
  query_scale_fn: QueryScaleFn | None = None
  query_scale_layers_fn: QueryScaleLayersFn | None = None
  uses_seq_len: bool = False
  default_rope_theta: float = DEFAULT_ROPE_THETA
  exclusive_keys: tuple[str, ...] = ()


ROPE_TYPES: dict[str, RopeType] = {}


def register_rope_type(name: str, rope_type: RopeType) -> RopeType:
  """Adds `rope_type` to `ROPE_TYPES` under `name`; raises ValueError if the name is taken."""
  if name in ROPE_TYPES:
    raise ValueError(f"rope type {name!r} is already registered; pick another name")
  ROPE_TYPES[name] = rope_type
  return rope_type


# ------------------------------------------------------------------------------------------------
# Shared formulas.


def _exponents(dim: int) -> np.ndarray:
  """`2i/dim` for i = 0..ceil(dim/2)-1, as HF's `torch.arange(0, dim, 2) / dim` (float64)."""
  return np.arange(0, dim, 2, dtype=np.float64) / dim


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
  """RoFormer eq. 15: `theta_i = base^(-2i/d)`; HF `compute_default_rope_parameters`."""
  return 1.0 / (float(base) ** _exponents(dim))


def _is_static(seq_len: Any) -> bool:
  return seq_len is None or isinstance(seq_len, int | np.integer)


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


# ------------------------------------------------------------------------------------------------
# Validation.


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _partial_rotary_factor(params: Params) -> float:
  value = params.get("partial_rotary_factor")
  return 1.0 if value is None else value


def _rotary_dim(params: Params, head_dim: int) -> int:
  return int(head_dim * _partial_rotary_factor(params))


def validate_rope_parameters(rope_parameters: dict, *, head_dim: int | None = None) -> None:
  """Raises ValueError (one sentence naming the key) if `rope_parameters` is unusable.

  Unlike HF, which warns on most bad values and raises KeyError only for missing keys, lcjax
  raises for unknown types, missing required keys, non-positive numbers, keys that belong to
  another type (`RopeType.exclusive_keys`) and, when `head_dim` is given, factor lists of the
  wrong length.
  """
  if not isinstance(rope_parameters, Mapping):
    raise ValueError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__}")
  name = rope_parameters.get("rope_type")
  if name is None:
    raise ValueError(
      "rope_parameters['rope_type'] is required; standardize_rope_parameters fills it in"
    )
  if name not in ROPE_TYPES:
    choices = ", ".join(sorted(ROPE_TYPES))
    raise ValueError(f"rope type {name!r} is unknown; choose one of {choices}")
  rope_type = ROPE_TYPES[name]
  for key in rope_type.required_keys:
    if rope_parameters.get(key) is None:
      raise ValueError(f"rope_parameters[{key!r}] is required for rope_type {name!r}")
  for other_name, other in ROPE_TYPES.items():
    for key in other.exclusive_keys:
      if rope_parameters.get(key) is not None and key not in rope_type.exclusive_keys:
        raise ValueError(
          f"rope_parameters[{key!r}] applies only to rope_type {other_name!r}, not {name!r}; "
          f"drop it or set rope_type={other_name!r}"
        )
  for key in ("rope_theta", "partial_rotary_factor", *rope_type.positive_keys):
    value = rope_parameters.get(key)
    if value is not None and (not _is_number(value) or value <= 0):
      raise ValueError(
        f"rope_parameters[{key!r}] must be a number > 0 for rope_type {name!r}, got {value!r}"
      )
  if _partial_rotary_factor(rope_parameters) > 1:
    raise ValueError(
      f"rope_parameters['partial_rotary_factor'] must be <= 1, got "
      f"{rope_parameters['partial_rotary_factor']}"
    )
  if head_dim is not None:
    if not isinstance(head_dim, int | np.integer) or head_dim <= 0 or head_dim % 2:
      raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if _rotary_dim(rope_parameters, head_dim) < 1 and name != "nope":
      raise ValueError(
        f"rope_parameters['partial_rotary_factor'] leaves no rotary dims for head_dim {head_dim}"
      )
  if rope_type.check_fn is not None:
    rope_type.check_fn(rope_parameters, name, head_dim)


# ------------------------------------------------------------------------------------------------
# Hugging Face config round trip.


def standardize_rope_parameters(hf_config: dict) -> dict:
  """Returns the rope_parameters dict of a HF config.json dict, standardized like transformers.

  Mirrors transformers 5.24 `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` and
  `standardize_rope_params`: legacy `rope_scaling` wins over `rope_parameters`; a legacy `type`
  key becomes `rope_type` (HF keeps both; lcjax drops `type`); a missing `rope_type` is
  "default"; top-level `rope_theta` (default 10000.0, or the type's `default_rope_theta`:
  500000.0 for `eabf`) and `partial_rotary_factor` are moved in unless the dict has them; for
  llama3/yarn/longrope `original_max_position_embeddings` is overwritten by a top-level
  `original_max_position_embeddings` when present (Phi-3 style), else defaults to
  `max_position_embeddings`. (transformers applies that overwrite on the second
  standardization, which `from_dict` and every rope init function run, so a bare
  `LlamaConfig(**cfg).rope_parameters` may still show the default until then.)

  lcjax also stores a top-level `max_position_embeddings` inside the dict, so `compute_inv_freq`
  needs only the dict. Per-layer (nested) dicts are not supported.
  """
  if not isinstance(hf_config, Mapping):
    raise ValueError(f"hf_config must be a dict, got {type(hf_config).__name__}")
  rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters")
  key = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
  if rope is None:
    rope = {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"hf_config[{key!r}] must be a dict, got {type(rope).__name__}")
  nested = [k for k, v in rope.items() if isinstance(v, Mapping)]
  if nested:
    raise ValueError(
      f"hf_config[{key!r}] holds per-layer dicts ({', '.join(map(str, nested))}), which lcjax "
      "does not support; pass one flat dict"
    )
  params = copy.deepcopy(dict(rope))
  legacy_type = params.pop("type", None)
  params.setdefault("rope_type", legacy_type if legacy_type is not None else "default")
  rope_type = ROPE_TYPES.get(params["rope_type"])  # unknown names fail validation below
  default_theta = DEFAULT_ROPE_THETA if rope_type is None else rope_type.default_rope_theta
  params.setdefault("rope_theta", hf_config.get("rope_theta", default_theta))
  if hf_config.get("partial_rotary_factor") is not None:
    params.setdefault("partial_rotary_factor", hf_config["partial_rotary_factor"])
  if params["rope_type"] in _HF_ORIGINAL_MAX_TYPES:
    if hf_config.get("original_max_position_embeddings") is not None:
      params["original_max_position_embeddings"] = hf_config["original_max_position_embeddings"]
    elif hf_config.get("max_position_embeddings") is not None:
      params.setdefault("original_max_position_embeddings", hf_config["max_position_embeddings"])
  if hf_config.get("max_position_embeddings") is not None:
    params["max_position_embeddings"] = hf_config["max_position_embeddings"]
  validate_rope_parameters(params)
  return params


def to_hf_rope_fields(rope_parameters: dict) -> dict:
  """Returns the config.json fields for `rope_parameters`, as transformers 5.24 writes them.

  `LlamaConfig(...).to_dict()` writes `rope_parameters` (with `rope_type` and `rope_theta` inside)
  and a top-level `max_position_embeddings`; lcjax's in-dict `max_position_embeddings` moves back
  to the top level. So `standardize_rope_parameters(to_hf_rope_fields(p)) == p` for standardized
  `p`. lcjax-only types (abf, eabf, giraffe, nope) are written as they are; transformers can
  store them but has no init function for them (`abf` is HF `default` with its `rope_theta`).
  """
  validate_rope_parameters(rope_parameters)
  params = copy.deepcopy(dict(rope_parameters))
  max_pos = params.pop("max_position_embeddings", None)
  fields = {"rope_parameters": params}
  if max_pos is not None:
    fields["max_position_embeddings"] = max_pos
  return fields


# ------------------------------------------------------------------------------------------------
# Frequencies and rotation.


def compute_inv_freq(
  rope_parameters: dict, head_dim: int, *, seq_len: Any = None
) -> tuple[np.ndarray | jax.Array, float]:
  """Returns `(inv_freq[head_dim // 2] float32, attention_factor)` for a standardized dict.

  `inv_freq` is a numpy array when the frequencies are static (every type, and dynamic /
  longrope with a Python `seq_len`), so `rope_cos_sin` can form exact angles from it, and a
  jax array when they depend on a traced `seq_len`.

  Matches transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)` for the HF
  types. `seq_len` is the maximum position + 1 of the current batch; only `dynamic` and `longrope`
  use it, and it may be a traced jax scalar (those two are then computed with jnp ops in fp32,
  without Python branching on its value). With `seq_len=None` they behave like HF at init
  (dynamic: unchanged base; longrope: short factors). Static frequencies are computed in float64
  and cast to float32.

  With `partial_rotary_factor < 1`, the `rotary_dim // 2` frequencies are padded with zeros to
  `head_dim // 2` entries (identity rotation); see the module docstring for the layout. A type
  that does not require `rope_theta` (`eabf`) uses its `default_rope_theta` when it is unset.
  """
  validate_rope_parameters(rope_parameters, head_dim=head_dim)
  rope_type = ROPE_TYPES[rope_parameters["rope_type"]]
  if rope_parameters.get("rope_theta") is None:  # only types that do not require it get here
    rope_parameters = {**rope_parameters, "rope_theta": rope_type.default_rope_theta}
  rotary_dim = _rotary_dim(rope_parameters, head_dim)
  inv_freq, attention_factor = rope_type.inv_freq_fn(rope_parameters, head_dim, rotary_dim, seq_len)
  num_pad = head_dim // 2 - inv_freq.shape[0]
  if isinstance(inv_freq, np.ndarray):  # static: stays on the host (exact angles need it)
    inv_freq_K = np.pad(inv_freq, (0, num_pad)).astype(np.float32)
  else:
    inv_freq_K = jnp.pad(_f32(inv_freq), (0, num_pad))
  return inv_freq_K, float(attention_factor)


def query_scale(rope_parameters: dict, positions_BT: jax.Array) -> jax.Array | None:
  """Returns the per-position query multiplier `[B, T]` float32, or None for most types.

  Only `eabf` has one. It multiplies the query (never the key) after `apply_rope`, so the logit
  scale is `lambda`, not `lambda^2`. Which layers apply it is `query_scale_layers`.
  """
  validate_rope_parameters(rope_parameters)
  fn = ROPE_TYPES[rope_parameters["rope_type"]].query_scale_fn
  return None if fn is None else fn(rope_parameters, positions_BT)


def query_scale_layers(rope_parameters: dict, num_layers: int) -> tuple[bool, ...] | None:
  """Per layer, whether it multiplies its query by `query_scale`; None when the type has none.

  The flags are static (they depend on the config only), so a model can hand them to a scan
  over layers as data. For `eabf` the first `eabf_unscaled_layers` layers (default 2, the
  paper's) are unscaled; a type without `query_scale_layers_fn` scales every layer.
  """
  validate_rope_parameters(rope_parameters)
  rope_type = ROPE_TYPES[rope_parameters["rope_type"]]
  if rope_type.query_scale_fn is None:
    return None
  if rope_type.query_scale_layers_fn is None:
    return (True,) * num_layers
  flags = tuple(bool(f) for f in rope_type.query_scale_layers_fn(rope_parameters, num_layers))
  if len(flags) != num_layers:
    raise ValueError(f"query_scale_layers_fn returned {len(flags)} flags for {num_layers} layers")
  return flags


def rope_cos_sin(
  inv_freq: Any,
  attention_factor: float | jax.Array,
  positions_BT: jax.Array,
  *,
  exact_angles: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Returns `(cos_BTK, sin_BTK)` float32, `K = head_dim // 2`, scaled by `attention_factor`.

  Angles are never formed in bf16 (bf16 positions or angles destroy RoPE at long range,
  transformers PR #29285). With `exact_angles` (the default) they are counted in turns with a
  fixed-point word (`lcjax.positional.angles.exact_angles`): under 1e-6 rad of error at every
  int32 position. That needs integer positions and `inv_freq` on the host (`compute_inv_freq`
  returns numpy for static frequencies); otherwise, and with `exact_angles=False`, the angle is
  HF's one fp32 product `float32(pos) * inv_freq`, rounded to the fp32 grid of the angle (2^-6
  rad at 512K positions; README, "fp32 RoPE angles at long positions"). As HF
  `LlamaRotaryEmbedding.forward`, both cos and sin are multiplied by `attention_factor`, so
  logits scale by `attention_factor^2`.
  """
  positions_BT = jnp.asarray(positions_BT)
  exact = (
    exact_angles and is_host_value(inv_freq) and jnp.issubdtype(positions_BT.dtype, jnp.integer)
  )
  angles_BTK = (
    angles.exact_angles(inv_freq, positions_BT)
    if exact
    else angles.fp32_angles(inv_freq, positions_BT)
  )
  factor = _f32(attention_factor)
  return jnp.cos(angles_BTK) * factor, jnp.sin(angles_BTK) * factor


def cos_sin_for_positions(
  rope_parameters: dict, head_dim: int, positions_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`rope_cos_sin` of a standardized dict at these positions, frequencies chosen for them.

  `seq_len = max(positions) + 1`, which dynamic NTK and LongRoPE read (`compute_inv_freq`). It
  is traced inside a model, so frequencies that depend on it are traced too, and traced
  frequencies fall back to fp32 angles. LongRoPE only switches between two static sets (short
  and long factors): both tables are formed with exact angles and one is selected. Dynamic
  NTK's frequencies are a traced function of seq_len and keep fp32 angles.
  """
  positions_BT = jnp.asarray(positions_BT)
  seq_len = jnp.max(positions_BT) + 1
  if rope_parameters["rope_type"] != "longrope":
    inv_freq_K, attention_factor = compute_inv_freq(rope_parameters, head_dim, seq_len=seq_len)
    return rope_cos_sin(inv_freq_K, attention_factor, positions_BT)
  original_max = int(rope_parameters["original_max_position_embeddings"])
  short = rope_cos_sin(*compute_inv_freq(rope_parameters, head_dim), positions_BT)
  long = rope_cos_sin(
    *compute_inv_freq(rope_parameters, head_dim, seq_len=original_max + 1), positions_BT
  )
  use_long = seq_len > original_max
  return tuple(jnp.where(use_long, lg, sh) for lg, sh in zip(long, short, strict=True))


def apply_rope(x_BTHD: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
  """Rotates `x_BTHD` in HF's half-split layout; computed in fp32, returned in x's dtype.

  HF `apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin` with `cos = concat(cos_K, cos_K)`
  and `rotate_half(x) = concat(-x[D/2:], x[:D/2])`, i.e. pairs `(i, i + D/2)` rotate by angle i.
  (HF casts cos/sin to x's dtype first; lcjax keeps fp32 until the end.)

  The VJP rotates the cotangent back, by -θ (a rotation's transpose, RoFormer eq. 34), in one
  elementwise pass, where autodiff would transpose the slices and the concatenation into
  separate buffers (0.26 GiB of a 1M-token step's peak, README "Checking a pod run"). The
  tables' cotangents are formed, and x kept for them, only when the tables are differentiated.
  """
  half = x_BTHD.shape[-1] // 2
  if x_BTHD.shape[-1] % 2 or cos_BTK.shape[-1] != half or sin_BTK.shape[-1] != half:
    raise ValueError(
      f"apply_rope needs an even head dim D and cos/sin with D/2 entries, got x {x_BTHD.shape}, "
      f"cos {cos_BTK.shape}, sin {sin_BTK.shape}"
    )
  return _rope(x_BTHD, cos_BTK, sin_BTK)


def _rotate_half_split(x_BTHD, cos_BTK, sin_BTK):
  """The rotation itself (fp32, returned in x's dtype); `apply_rope`'s forward."""
  half = x_BTHD.shape[-1] // 2
  x_f32 = x_BTHD.astype(jnp.float32)
  x1_BTHK, x2_BTHK = x_f32[..., :half], x_f32[..., half:]
  cos_BT1K = cos_BTK.astype(jnp.float32)[..., None, :]
  sin_BT1K = sin_BTK.astype(jnp.float32)[..., None, :]
  out_BTHD = jnp.concatenate(
    [x1_BTHK * cos_BT1K - x2_BTHK * sin_BT1K, x2_BTHK * cos_BT1K + x1_BTHK * sin_BT1K], axis=-1
  )
  return out_BTHD.astype(x_BTHD.dtype)


@jax.custom_vjp
def _rope(x_BTHD, cos_BTK, sin_BTK):
  return _rotate_half_split(x_BTHD, cos_BTK, sin_BTK)


def _rope_fwd(x, cos, sin):
  # symbolic_zeros=True: the primals come as CustomVJPPrimal(value, perturbed).
  out_BTHD = _rotate_half_split(x.value, cos.value, sin.value)
  tables_differentiated = cos.perturbed or sin.perturbed
  return out_BTHD, (cos.value, sin.value, x.value if tables_differentiated else None)


def _sum_to(a, shape):
  """Sums the leading and broadcast (size-1) axes of `a` down to `shape`."""
  a = a.sum(axis=tuple(range(a.ndim - len(shape)))) if a.ndim > len(shape) else a
  axes = tuple(i for i, (n, m) in enumerate(zip(a.shape, shape, strict=True)) if m == 1 and n != 1)
  return a.sum(axis=axes, keepdims=True) if axes else a


def _rope_bwd(res, g_BTHD):
  cos_BTK, sin_BTK, x_BTHD = res
  if isinstance(g_BTHD, SymbolicZero):
    return None, None, None
  dx_BTHD = _rotate_half_split(g_BTHD, cos_BTK, -sin_BTK)  # R(θ)ᵀ = R(-θ)
  if x_BTHD is None:
    return dx_BTHD, None, None
  half = x_BTHD.shape[-1] // 2
  g_f32, x_f32 = g_BTHD.astype(jnp.float32), x_BTHD.astype(jnp.float32)
  g1, g2, x1, x2 = g_f32[..., :half], g_f32[..., half:], x_f32[..., :half], x_f32[..., half:]
  dcos_BTK = _sum_to(jnp.sum(g1 * x1 + g2 * x2, axis=-2), cos_BTK.shape)
  dsin_BTK = _sum_to(jnp.sum(g2 * x1 - g1 * x2, axis=-2), sin_BTK.shape)
  return dx_BTHD, dcos_BTK.astype(cos_BTK.dtype), dsin_BTK.astype(sin_BTK.dtype)


_rope.defvjp(_rope_fwd, _rope_bwd, symbolic_zeros=True)
