"""The config skeleton every experiment shares, and its validation before tracing.

Sections (DESIGN.md "Config skeleton"): model, data, train, checkpoint, eval,
mesh, parallel, attention, init_from. `configs/NAME.py` start from
`base_config()` and change what they need.
"""

from __future__ import annotations

import ml_collections

from lcjax.config import require
from lcjax.models import validate_model
from lcjax.models.config import llama_config
from lcjax.parallel.mesh import validate_parallel_config

__all__ = ["base_config", "validate_config", "model_config_for_run"]


def base_config() -> ml_collections.ConfigDict:
  from lcjax.data import default_data_config

  c = ml_collections.ConfigDict()
  c.model = llama_config()
  c.data = default_data_config()
  c.train = dict(
    steps=1000,
    batch_size=8,
    grad_accum=1,
    seed=0,
    lr=3e-4,
    warmup_steps=100,
    schedule="cosine",
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,
    grad_clip_norm=1.0,
    freeze=(),  # regexes over parameter paths, e.g. ("layers/.*/mlp",)
    trainable=(),  # regexes that stay trainable even when matched by freeze
    loss_chunk=1024,  # positions per chunk of the cross-entropy
    log_every=10,
    peak_flops=ml_collections.config_dict.placeholder(float),  # None: chip table / CPU matmul
  )
  c.checkpoint = dict(every_steps=200, keep=3, async_save=True)
  c.eval = dict(
    every_steps=200,  # validation loss during training; 0 turns it off
    batches=4,
    ppl_lengths=(),  # context lengths for perplexity vs. length at the end of training
    ppl_stride_fraction=1.0,
    ppl_max_documents=16,
    rope_variants={},  # name -> rope dict used at evaluation time (e.g. YaRN without training)
    passkey=dict(enabled=False, lengths=(), depths=(0.0, 0.5, 1.0), trials=4),
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
  c.parallel = dict(context_strategy="ring", layout="zigzag")
  c.attention = dict(impl="auto", block_q=512, block_kv=512)
  c.init_from = ml_collections.config_dict.placeholder(str)  # a Hugging Face folder
  c.model_overrides = {}  # applied on top of the checkpoint's model config with init_from
  return c


def model_config_for_run(config, hf_model_config=None):
  """The model config a run builds: config.model, or the checkpoint's plus model_overrides.

  The attention section (impl, block sizes) and the context strategy always come from
  config.attention / config.parallel, for families that have attention.
  """
  cfg = (
    hf_model_config if hf_model_config is not None else config.model
  ).copy_and_resolve_references()
  if hf_model_config is not None:
    for key, value in config.model_overrides.items():
      require(key in cfg, f"model_overrides.{key} is not a model field; known: {sorted(cfg)}")
      cfg[key] = value
  runtime = dict(
    attention_impl=config.attention.impl,
    attention_block_q=config.attention.block_q,
    attention_block_kv=config.attention.block_kv,
    context_strategy=config.parallel.context_strategy,
  )
  for key, value in runtime.items():
    if key in cfg:  # families without attention (mamba2) have none of these
      cfg[key] = value
  return cfg


def validate_config(config, *, num_devices: int | None = None) -> None:
  """Raises ConfigError (one sentence: field and fix) before anything is traced.

  `num_devices`: the devices the mesh will span (default: all visible devices).
  """
  from lcjax.data import validate_data_config

  if config.init_from is None:
    validate_model(model_config_for_run(config))
  validate_data_config(config.data)
  t = config.train
  for name in ("steps", "batch_size", "grad_accum", "loss_chunk", "log_every"):
    require(t[name] >= 1, f"train.{name}={t[name]} must be a positive integer")
  require(
    t.batch_size % t.grad_accum == 0,
    f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
  )
  require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1")
  require(config.checkpoint.keep >= 1, "checkpoint.keep must be >= 1 (keep-last-K)")
  validate_parallel_config(
    config.mesh,
    config.parallel,
    seq_len=config.data.seq_len,
    batch_size=t.batch_size // t.grad_accum,
    num_devices=num_devices,
  )
  if config.init_from is not None:
    import os

    require(
      os.path.isdir(config.init_from),
      f"init_from={config.init_from!r} is not a folder; point it at a Hugging Face checkpoint",
    )
