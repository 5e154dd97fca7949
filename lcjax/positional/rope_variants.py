"""RoPE variants from the long-context literature, registered in `lcjax.positional.rope`.

Each is one `register_rope_type` call on the shared registry, so configs name them exactly like
the Hugging Face types (`rope=dict(rope_type="eabf", ...)`):

- `abf`: Xiong et al. 2023, Effective Long-Context Scaling (Llama 2 Long). Keys: rope_theta.
- `eabf`: Zhang et al. 2024, Extending LLMs' Context Window with 100 Samples. Keys:
  original_max_position_embeddings (the training length in the query scale), optional
  rope_theta (default 500,000, the reference's base) and eabf_unscaled_layers (default 2: the
  first two layers keep an unscaled query, as in the paper).
- `giraffe`: Pal et al. 2023, Giraffe. Keys: rope_theta, truncate_wavelength, optional factor
  and scale_power.
- `nope`: Kazemnejad et al. 2023, NoPE. No keys.
- `ntk`: bloc97 2023, fixed "NTK-aware" scaled RoPE. Keys: rope_theta, factor.

Helpers for untuned small-scale studies, where the searched or tuned keys of a type do not
exist: `longrope_factors` (LongRoPE's per-dimension factors) and `giraffe_truncate_wavelength`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.positional.rope import (
  Params,
  RopeType,
  _base_inv_freq,
  _is_number,
  register_rope_type,
)
from lcjax.positional.rope_hf_types import _check_dynamic, _inv_freq_default, _inv_freq_yarn

_ORIG = "original_max_position_embeddings"

# Entropy-ABF's base: GAIR-NLP/Entropy-ABF `patch/EABF.py::_init_rope_new` builds the rotary
# embedding of `rope_scaling={"type": "eabf"}` with `base=500000` whatever the config says.
# lcjax uses it only when `rope_theta` is unset (in the dict and in the HF config), so that a
# study can still choose another base; unset, HF's 10,000 would silently drop the "ABF" half.
EABF_ROPE_THETA = 500000.0
# Leading layers without the query scale: the paper's 2 (`apply_eabf(model, count=2)`).
EABF_UNSCALED_LAYERS = 2


def _inv_freq_abf(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Adjusted Base Frequency (Xiong et al. 2023, "Effective Long-Context Scaling of Foundation
  Models", arXiv:2309.16039, "Positional Encoding"): default RoPE with a larger `rope_theta`
  (10,000 -> 500,000 for Llama 2 Long). Equivalent to `default`; the name records the intent.
  """
  return _inv_freq_default(params, head_dim, dim, seq_len)


def _query_scale_eabf(params: Params, positions_BT: jax.Array) -> jax.Array:
  """Entropy-aware ABF query scale (Zhang et al. 2024, "Extending LLMs' Context Window with 100
  Samples", arXiv:2401.07004; GAIR-NLP/Entropy-ABF `patch/EABF.py::apply_rotary_pos_emb_scale`):
  `lambda = max(1, ln(pos + 1) / ln(L_train))` with `L_train = original_max_position_embeddings`
  (the reference hard-codes `log(4096)`, Llama-2's length). Which layers apply it:
  `_query_scale_layers_eabf`.
  """
  train_len = float(params["original_max_position_embeddings"])
  pos_BT = jnp.asarray(positions_BT).astype(jnp.float32)
  return jnp.maximum(jnp.float32(1.0), jnp.log1p(pos_BT) / jnp.float32(math.log(train_len)))


def _eabf_unscaled_layers(params: Params) -> int:
  """`rope_parameters['eabf_unscaled_layers']`, or the paper's 2 when unset."""
  value = params.get("eabf_unscaled_layers")
  return EABF_UNSCALED_LAYERS if value is None else int(value)


def _query_scale_layers_eabf(params: Params, num_layers: int) -> tuple[bool, ...]:
  """Layers `>= eabf_unscaled_layers` scale their query; the first ones keep it as trained.

  The paper (Zhang et al. 2024, arXiv:2401.07004) applies its attention scalar to every layer
  but the first two, and its code says the same: `apply_eabf(model, count=2)` in
  GAIR-NLP/Entropy-ABF `patch/EABF.py` restores `apply_rotary_pos_emb_old` (no scale) on
  `layers[0]` and `layers[1]`. Caveat: it does so by setting the attribute
  `self_attn.apply_rotary_pos_emb`, which the repo's own flash-attention `forward`
  (`patch/flash_attn_monkey_patch.py`, which calls `modeling_llama.apply_rotary_pos_emb`, patched
  globally to the scaled version; `main.py` uses it by default) does not read and transformers
  4.31's `LlamaAttention.forward` may not either, so the released code may scale every layer.
  lcjax implements the paper by default and offers the code's possible behaviour as
  `eabf_unscaled_layers=0`.

  The count lives in the rope dict rather than on the model config because it is part of the
  `eabf` type: it travels with the dict wherever a RoPE is swapped (`eval.rope_variants`,
  `model_overrides`, `model_from_params`), means nothing for any other type (validation
  rejects it there), and round-trips through config.json's `rope_parameters` like HF's own
  per-type keys. A count >= num_layers scales no layer: the model then equals `abf` with the
  same `rope_theta` exactly.
  """
  unscaled = _eabf_unscaled_layers(params)
  return tuple(i >= unscaled for i in range(num_layers))


def _inv_freq_giraffe(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Giraffe truncated basis (Pal et al. 2023, "Giraffe: Adventures in Expanding Context Lengths
  in LLMs", arXiv:2308.10882; abacusai/Long-Context `python/models/interpolate.py`,
  `ScaledLlamaRotaryEmbedding` + `truncate_frequency`).

  Starting from `base^(-2i/d)`: divide by `factor` when `factor > 1` (linear scaling); multiply by
  `(1 - i / (d/2))^scale_power` when `scale_power > 0`; then, with `b = 2 pi / truncate_wavelength`
  (skipped when it is 0), keep frequencies `>= b`, set those in `[b/8, b)` to `b/16` and those
  `< b/8` to 0.
  """
  del head_dim, seq_len
  inv_freq = _base_inv_freq(params["rope_theta"], dim)
  factor = float(params.get("factor") or 1.0)
  if factor > 1.0:
    inv_freq = inv_freq / factor
  scale_power = float(params.get("scale_power") or 0.0)
  if scale_power > 0:
    num = len(inv_freq)
    inv_freq = inv_freq * (1.0 - np.arange(num) / num) ** scale_power
  truncate_wavelength = float(params["truncate_wavelength"])
  if truncate_wavelength > 0:
    cutoff = 2 * math.pi / truncate_wavelength
    # Both tests read the frequencies before truncation (reference `truncate_frequency`).
    inv_freq = np.where(
      inv_freq < cutoff / 8, 0.0, np.where(inv_freq < cutoff, cutoff / 16, inv_freq)
    )
  return inv_freq, 1.0


def _inv_freq_ntk(params: Params, head_dim: int, dim: int, seq_len: Any):
  """Fixed NTK-aware scaling (bloc97 2023, "NTK-Aware Scaled RoPE allows LLaMA models to have
  extended (8k+) context size without any fine-tuning", r/LocalLLaMA; YaRN arXiv:2309.00071
  §3.1, Definition 1): `base' = base * factor^(d / (d - 2))`, d the rotary dim.

  The lowest frequency (i = d/2 - 1) is divided by exactly `factor`, as in PI, and the highest
  (i = 0) is unchanged. Written as `base^(-2i/d) * factor^(-2i/(d-2))`, the form `dynamic` uses
  (`_inv_freq_dynamic`), so `dynamic` with factor 1 at seq_len = factor * max_position_embeddings
  computes the same numbers.
  """
  del head_dim, seq_len
  exponents = np.arange(0, dim, 2, dtype=np.float64) / (dim - 2)
  factor = float(params["factor"])
  return _base_inv_freq(params["rope_theta"], dim) * factor ** (-exponents), 1.0


def _inv_freq_nope(params: Params, head_dim: int, dim: int, seq_len: Any):
  """No positional encoding (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
  Generalization in Transformers", arXiv:2305.19466): zero frequencies, identity rotation.
  """
  del params, dim, seq_len
  return np.zeros(head_dim // 2, dtype=np.float64), 1.0


def _check_eabf(params: Params, name: str, head_dim: int | None) -> None:
  del head_dim
  if params["original_max_position_embeddings"] <= 1:
    raise ValueError(
      f"rope_parameters['original_max_position_embeddings'] must be > 1 for rope_type {name!r}"
    )
  value = params.get("eabf_unscaled_layers")
  is_count = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0
  if value is not None and not is_count:
    raise ValueError(
      f"rope_parameters['eabf_unscaled_layers'] must be an integer >= 0 (leading layers without "
      f"the query scale; 0 scales every layer) for rope_type {name!r}, got {value!r}"
    )


def _check_giraffe(params: Params, name: str, head_dim: int | None) -> None:
  del head_dim
  value = params["truncate_wavelength"]
  if not _is_number(value) or value < 0:
    raise ValueError(
      f"rope_parameters['truncate_wavelength'] must be a number >= 0 (0 turns truncation off) for "
      f"rope_type {name!r}, got {value!r}"
    )


register_rope_type("abf", RopeType(_inv_freq_abf))
register_rope_type(
  "eabf",
  RopeType(
    _inv_freq_abf,
    (_ORIG,),  # rope_theta defaults to the reference's base
    check_fn=_check_eabf,
    query_scale_fn=_query_scale_eabf,
    query_scale_layers_fn=_query_scale_layers_eabf,
    default_rope_theta=EABF_ROPE_THETA,
    exclusive_keys=("eabf_unscaled_layers",),
  ),
)
register_rope_type(
  "giraffe",
  RopeType(_inv_freq_giraffe, ("rope_theta", "truncate_wavelength"), ("factor",), _check_giraffe),
)
register_rope_type("nope", RopeType(_inv_freq_nope, required_keys=()))
register_rope_type(
  "ntk",
  RopeType(_inv_freq_ntk, ("rope_theta", "factor"), ("factor",), check_fn=_check_dynamic),
)


# ------------------------------------------------------------------------------------------------
# Keys for untuned small-scale studies.


def longrope_factors(
  head_dim: int, rope_theta: float, factor: float, original_max_position_embeddings: int
) -> dict[str, list[float]]:
  """`short_factor` and `long_factor` for an untuned `longrope` run; NOT LongRoPE's searched ones.

  LongRoPE (Ding et al. 2024, arXiv:2402.13753, §3.2) divides frequency i by a per-dimension
  rescale factor `lambda_i >= 1` (non-decreasing in i) found by an evolutionary search on
  perplexity at the target length, whose initial population holds the PI, NTK-aware and YaRN
  factors. Without that search (a small model, no budget), this returns the YaRN member of
  that initial population for the full head: `long_factor[i] = base_inv_freq_i /
  yarn_inv_freq_i`, the "NTK-by-parts" ramp of YaRN (arXiv:2309.00071 §3.2; HF
  `_compute_yarn_parameters`, beta_fast=32, beta_slow=1), which runs from 1 (dimensions that
  rotate more than 32 times over `original_max_position_embeddings`) to `factor` (fewer than
  once); and `short_factor = 1` everywhere, so up to `original_max_position_embeddings`
  the frequencies are the trained ones. LongRoPE's other searched knob, the n-hat initial
  positions left unscaled, has no field in the HF `longrope` type and is not modelled.

  So `longrope` with these factors differs from `yarn` with the same factor only in its
  attention factor, `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` applied at
  every length (HF), against YaRN's `0.1 ln(factor) + 1`, and in switching to the short
  factors at lengths <= `original_max_position_embeddings`.

  Returns:
    dict(short_factor=[head_dim // 2 floats], long_factor=[head_dim // 2 floats]), to merge
    into a `rope_type="longrope"` dict with the same `factor` and
    `original_max_position_embeddings`.
  """
  yarn = {
    "rope_theta": rope_theta,
    "factor": factor,
    "original_max_position_embeddings": original_max_position_embeddings,
  }
  yarn_inv_freq, _ = _inv_freq_yarn(yarn, head_dim, head_dim, None)
  base_inv_freq = _base_inv_freq(rope_theta, head_dim)
  long_factor = base_inv_freq / yarn_inv_freq
  return {
    "short_factor": [1.0] * (head_dim // 2),
    "long_factor": [float(x) for x in long_factor],
  }


def giraffe_truncate_wavelength(factor: float, original_max_position_embeddings: int) -> float:
  """`truncate_wavelength` for an untuned `giraffe` run with linear `factor`: factor * T0.

  Giraffe's truncated basis (Pal et al. 2023, arXiv:2308.10882; abacusai/Long-Context README:
  keep "only frequencies that were fast enough so that [the model] got at least one full cycle
  during training") keeps frequencies whose wavelength is at most `truncate_wavelength`, after
  the division by `factor`. The paper fine-tunes with the basis; for an untuned model the
  training that counts is pretraining at T0 = `original_max_position_embeddings`, and a
  frequency made a full cycle there iff its wavelength after scaling is at most factor * T0.
  So this choice keeps exactly the (scaled) frequencies pretraining saw a full cycle of, maps
  the next octaves (wavelengths up to 8 * factor * T0) to one slow frequency and zeroes the
  rest. It is a documented choice for small-scale runs, not a value from the paper.
  """
  return float(factor) * float(original_max_position_embeddings)
