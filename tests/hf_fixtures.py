"""Tiny random transformers checkpoints for interop tests (torch on CPU)."""

from __future__ import annotations

import torch
import transformers

HEAD_DIM = 16
ORIGINAL_MAX = 16  # tests run 64 tokens: beyond original and max positions
MAX_POS = 32

ROPE_CASES = {
  "default": dict(rope_type="default", rope_theta=10000.0),
  "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
  "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
  "yarn": dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL_MAX
  ),
  "llama3": dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=ORIGINAL_MAX,
  ),
  "longrope": dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
    long_factor=[1.5 + 0.5 * i for i in range(HEAD_DIM // 2)],
    original_max_position_embeddings=ORIGINAL_MAX,
  ),
}

MODEL_TYPES = ("llama", "mistral", "qwen2")
# A head_dim that is not hidden_size // num_attention_heads (64 // 4 = 16): all three
# transformers types read config.head_dim, so q/k/v/o projections are 4*24 = 96 wide.
ODD_HEAD_DIM = 24


def hf_config(model_type: str, rope: dict, **overrides) -> transformers.PretrainedConfig:
  kwargs = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POS,
    rms_norm_eps=1e-6,
    rope_parameters=dict(rope),
    tie_word_embeddings=False,
  )
  if model_type == "llama":
    kwargs.update(attention_bias=True, mlp_bias=False)
  elif model_type == "mistral":
    kwargs.update(sliding_window=12)
  else:  # qwen2: layer 1 uses a sliding window, layer 0 full attention
    kwargs.update(use_sliding_window=True, sliding_window=12, max_window_layers=1)
  kwargs.update(overrides)
  config_cls = transformers.AutoConfig.for_model(model_type).__class__
  return config_cls(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
  """Scales weights up from HF's tiny init so logits vary and every bias matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if "norm" in name:
        param.copy_(1.0 + 0.2 * noise)
      else:
        param.copy_(0.15 * noise)


def hf_model(config: transformers.PretrainedConfig, seed: int = 0):
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  randomize_(model, seed)
  return model.eval()


def hf_logits(model, tokens) -> torch.Tensor:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
