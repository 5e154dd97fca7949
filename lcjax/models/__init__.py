"""Model registry: `build_model(config.model, rngs=...)` builds any lcjax family."""

from __future__ import annotations

from flax import nnx

from lcjax.config import ConfigError
from lcjax.models import transformer
from lcjax.models.config import llama_config, longgen_layer_types, validate_model_config
from lcjax.models.generate import generate
from lcjax.models.mamba2 import Mamba2LM, mamba2_config, validate_mamba2_config
from lcjax.models.transformer import DecoderLM

__all__ = [
  "build_model",
  "default_model_config",
  "generate",
  "llama_config",
  "longgen_layer_types",
  "mamba2_config",
  "validate_model_config",
  "validate_model",
  "DecoderLM",
  "Mamba2LM",
  "FAMILIES",
]

# family name → model class and its config validation; a new family is one entry each.
FAMILIES = {"llama": DecoderLM, "mamba2": Mamba2LM}
VALIDATORS = {"llama": validate_model_config, "mamba2": validate_mamba2_config}
DEFAULT_CONFIGS = {"llama": llama_config, "mamba2": mamba2_config}


def default_model_config(family: str):
  """The default model config of `family` (what `llama_config()` / `mamba2_config()` return)."""
  if family not in DEFAULT_CONFIGS:
    raise ConfigError(f"model.family={family!r} is unknown; choose one of {sorted(FAMILIES)}")
  return DEFAULT_CONFIGS[family]()


def validate_model(model_config) -> None:
  """Validates any family's model config (ConfigError naming the field and the fix)."""
  family = model_config.get("family")
  if family not in VALIDATORS:
    raise ConfigError(f"model.family={family!r} is unknown; choose one of {sorted(FAMILIES)}")
  VALIDATORS[family](model_config)


def build_model(model_config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model `model_config.family` names, with float32 parameters."""
  family = model_config.get("family")
  if family not in FAMILIES:
    raise ConfigError(f"model.family={family!r} is unknown; choose one of {sorted(FAMILIES)}")
  return FAMILIES[family](model_config, rngs=rngs)


def __getattr__(name: str):
  if name == "LlamaLM":  # the deprecated name, with its warning (lcjax.models.transformer)
    return transformer.LlamaLM
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
