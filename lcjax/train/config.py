"""The config skeleton every experiment shares, and its validation before tracing.

Sections: model, data, train, checkpoint, eval, mesh, parallel, attention, init_from,
model_overrides (the README's config table lists their fields). `configs/NAME.py` start
from `base_config()` and change what they need. Every setting has one home: the
attention implementation and block sizes live in `attention`, the context-parallel
strategy in `parallel`, so a run's `model` section has no copy of them
(`lcjax.train.run_model.model_config_for_run` fills them in when the model is built).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from lcjax.attention.registry import resolve_impl
from lcjax.config import ConfigError, require
from lcjax.data import default_data_config, validate_data_config
from lcjax.eval.longbench import validate_longbench_config
from lcjax.eval.mqar import MQAR_THRESHOLD, validate_synthetic_evals
from lcjax.eval.passkey import PASSKEY_THRESHOLD
from lcjax.eval.perplexity import PPL_PROTOCOLS
from lcjax.eval.ruler import EFFECTIVE_THRESHOLD, validate_ruler_config
from lcjax.interop.safetensors_io import CheckpointError
from lcjax.models import validate_model
from lcjax.models.config import head_dim, llama_config, scan_layers_enabled
from lcjax.parallel.mesh import validate_parallel_config
from lcjax.positional.rope import validate_rope_parameters
from lcjax.train.run_model import RUNTIME_MODEL_FIELDS, model_config_for_run
from lcjax.train.run_model import init_model_config as read_init_model_config

__all__ = ["base_config", "validate_config"]


def base_config() -> ml_collections.ConfigDict:
  """The full default run config; every field a config file or the command line may set."""
  c = ml_collections.ConfigDict()
  c.model = llama_config()
  for key in RUNTIME_MODEL_FIELDS:  # their home is c.attention / c.parallel
    del c.model[key]
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
    # With init_from = an lcjax run folder, start from its newest checkpoint's optimizer
    # state too (AdamW moments and count; the schedule restarts): ProLong's 512K stage.
    carry_optimizer_state=False,
    loss_chunk=1024,  # positions per chunk of the cross-entropy
    log_every=10,
    peak_flops=ml_collections.config_dict.placeholder(float),  # None: chip table / CPU matmul
    # RAM per host for what the step keeps in host memory (model.remat=offload/offload_dots),
    # checked by --compile_only. Default: a v5p TPU VM (4 chips), "RAM (GB) (4-chip VM) 448"
    # in https://cloud.google.com/tpu/docs/v5p; half of it with NUMA binding.
    host_memory_budget_gib=448.0,
  )
  c.checkpoint = dict(every_steps=200, keep=3, async_save=True)
  c.eval = dict(
    every_steps=200,  # validation loss during training; 0 turns it off
    batches=4,
    ppl_lengths=(),  # context lengths for perplexity vs. length at the end of training
    ppl_protocol="sliding",  # or "truncated": one window of L tokens per document (YaRN)
    ppl_stride_fraction=1.0,  # sliding windows only
    ppl_max_documents=16,
    # sliding protocol: score at most this many tokens of each kept document (None: all)
    ppl_max_tokens_per_document=ml_collections.config_dict.placeholder(int),
    rope_variants={},  # name -> rope dict used at evaluation time (e.g. YaRN without training)
    # threshold: eval/passkey_max_length is the longest length with accuracy >= threshold
    passkey=dict(
      enabled=False, lengths=(), depths=(0.0, 0.5, 1.0), trials=4, threshold=PASSKEY_THRESHOLD
    ),
    # Mamba-2 SSM-state statistics every `every` positions of a `length`-token passkey prompt
    # (lcjax.eval.state_capacity.state_norm_evaluation): eval/state_norms.json, eval/state_*
    state_norms=dict(enabled=False, length=4096, every=64),
    # Synthetic-task recall (lcjax.eval.mqar), for models trained on that data.synthetic.task:
    # MQAR value accuracy at each number of pairs and the capacity (largest K >= threshold),
    # and token-passkey accuracy vs. length (eval/token_passkey_max_length at >= threshold).
    mqar=dict(enabled=False, pairs=(2, 4, 8, 16, 32, 64), rows=64, threshold=MQAR_THRESHOLD),
    token_passkey=dict(
      enabled=False, lengths=(), depths=(0.1, 0.5, 0.9), trials=8, threshold=PASSKEY_THRESHOLD
    ),
    # scripts/eval.py's task suite (lcjax.eval.ruler): RULER task names or groups ("ruler",
    # "niah", "aggregation", ...) at `lengths` tokens; when set, eval.py runs only these.
    tasks=(),
    lengths=(),
    ruler=dict(
      samples=20,  # per task and length (RULER: 500)
      seed=ml_collections.config_dict.placeholder(int),  # None: train.seed
      depths=(),  # NIAH needle depths in % (a grid); empty: RULER's random depths
      batch_size=8,
      threshold=EFFECTIVE_THRESHOLD,  # effective length: longest length averaging >= this
      scoring=("generate", "teacher_forced"),
      haystack="code",  # RULER's essays -> held-out stdlib files, or a folder of .txt/.md
      qa_path=ml_collections.config_dict.placeholder(str),  # SQuAD-style JSONL; None: no qa
      chat_template="base",  # a key of lcjax.eval.ruler_data.MODEL_TEMPLATES
      tokens_to_generate=0,  # 0: RULER's per task (niah 128, vt 30, cwe 120, fwe 50, qa 32)
    ),
    # LongBench on local files (lcjax.eval.longbench), run when eval.tasks names "longbench".
    longbench=dict(
      path=ml_collections.config_dict.placeholder(str),  # <dataset>.jsonl folder, or one file
      datasets=(),  # e.g. ("hotpotqa", "qasper_e"); empty: every LongBench file in path
      max_len=3500,  # prompt tokens (pred.py max_length); longer prompts lose their middle
      limit=ml_collections.config_dict.placeholder(int),  # first rows per dataset; None: all
      batch_size=8,
      chat_template="base",  # a key of lcjax.eval.ruler_data.MODEL_TEMPLATES; base: none
      zh_segmenter="auto",  # Chinese metrics: jieba when installed, else characters
    ),
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
  c.parallel = dict(context_strategy="ring", layout="zigzag")
  c.attention = dict(impl="auto", block_q=512, block_kv=512)
  # A Hugging Face folder, an lcjax run folder (its newest complete checkpoint) or an lcjax
  # params folder (scripts/convert_hf.py --to lcjax); see lcjax.train.run_model.load_init.
  c.init_from = ml_collections.config_dict.placeholder(str)
  c.model_overrides = {}  # applied on top of the checkpoint's model config with init_from
  # A multi-stage run: dicts of dotted overrides, one per stage, run by scripts/train.py in
  # WORKDIR/stage-<k>/, each from the previous stage's checkpoint (lcjax.sweep.stages).
  c.stages = ()
  return c


def validate_config(
  config, *, num_devices: int | None = None, init_model_config=None, platform: str | None = None
) -> None:
  """Raises ConfigError (one sentence: field and fix) before anything is traced.

  `num_devices`: the devices the mesh will span (default: all visible devices).
  `platform`: the platform the step compiles for (default: this process's backend; an
  AOT compile passes its topology's).
  `init_model_config`: the model config `init_from` will hold, for a checkpoint that is
  not written yet (a sweep point that starts after another); by default it is read from
  the `init_from` folder's config file, so `model_overrides` are checked before loading.
  """
  model_cfg = None
  if config.init_from is None:
    model_cfg = model_config_for_run(config)
  else:
    if init_model_config is None:
      require(
        os.path.isdir(config.init_from),
        f"init_from={config.init_from!r} is not a folder; point it at a Hugging Face "
        "checkpoint, an lcjax run folder or an lcjax params folder",
      )
      try:
        init_model_config = read_init_model_config(config.init_from)
      except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"init_from: {e}") from None
    model_cfg = model_config_for_run(config, init_model_config)
  try:
    validate_model(model_cfg)
  except ConfigError as e:
    if config.init_from is None:
      raise
    # The fields are the init_from model's with model_overrides applied.
    raise ConfigError(f"init_from model with model_overrides: {e}") from None
  _validate_rope_variants(config.eval.rope_variants, model_cfg)
  require(
    config.eval.ppl_protocol in PPL_PROTOCOLS,
    f"eval.ppl_protocol={config.eval.ppl_protocol!r} is unknown; choose one of "
    f"{', '.join(PPL_PROTOCOLS)}",
  )
  cut = config.eval.get("ppl_max_tokens_per_document")
  if cut is not None and config.eval.ppl_lengths:
    require(
      cut > max(config.eval.ppl_lengths),
      f"eval.ppl_max_tokens_per_document={cut} is not above the longest eval.ppl_lengths "
      f"({max(config.eval.ppl_lengths)}); raise it or unset it (None scores whole documents)",
    )
  _validate_eval_tasks(config.eval, model_cfg)
  validate_synthetic_evals(config.eval, config.data)
  validate_ruler_config(config.eval)
  validate_longbench_config(config.eval)
  validate_data_config(config.data)
  _validate_anchor(config, model_cfg)
  t = config.train
  for name in ("steps", "batch_size", "grad_accum", "loss_chunk", "log_every"):
    require(t[name] >= 1, f"train.{name}={t[name]} must be a positive integer")
  require(
    t.host_memory_budget_gib > 0,
    f"train.host_memory_budget_gib={t.host_memory_budget_gib} must be positive: the GiB of "
    "RAM per host, e.g. 448 for a v5p host",
  )
  require(
    t.batch_size % t.grad_accum == 0,
    f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
  )
  if t.carry_optimizer_state:
    require(
      config.init_from is not None
      # A sweep point or stage validates before the run it starts from has written.
      and (
        init_model_config is not None
        or os.path.isdir(os.path.join(config.init_from, "checkpoints"))
      ),
      f"train.carry_optimizer_state needs init_from to be an lcjax run folder with checkpoints "
      f"(got init_from={config.init_from!r}); unset it or point init_from at a run",
    )
  require(
    not config.get("stages"),
    "config.stages is set: scripts/train.py runs the stages (lcjax.sweep.stages.run_stages); "
    "lcjax.train.train runs one stage's config",
  )
  require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps must be >= 1")
  require(config.checkpoint.keep >= 1, "checkpoint.keep must be >= 1 (keep-last-K)")
  sizes = validate_parallel_config(
    config.mesh,
    config.parallel,
    seq_len=config.data.seq_len,
    batch_size=t.batch_size // t.grad_accum,
    num_devices=num_devices,
  )
  _check_compiler_limits(config, model_cfg, sizes, platform or jax.default_backend())


def _check_compiler_limits(config, model_cfg, sizes: dict, platform: str) -> None:
  """Combinations a compiler is known to abort on (a process abort cannot be caught).

  libtpu 0.0.42 (jax 0.10.2) aborts in `tpu_layout_assignment.cc` ("Check failed:
  num_window_dims == normalized_rank - 1") when it compiles scanned layers whose
  inputs are offloaded to host, with the Pallas (Mosaic) attention kernels, while the
  rows are sharded over data/fsdp. One row per context group (data = fsdp = 1, as
  `configs/llama3_8b_long.py:1m8`) compiles, and so do remat=full, the unrolled loop and
  the pure-JAX blockwise attention (measured for issue #15 on the tiny quickstart at
  4K tokens, v5p:2x2x2, fsdp 2 × context 4).
  """
  if platform != "tpu" or model_cfg.get("remat") not in ("offload", "offload_dots"):
    return
  if "num_heads" not in model_cfg or not scan_layers_enabled(model_cfg):
    return
  if resolve_impl(config.attention.impl, platform=platform) != "pallas":
    return
  require(
    sizes["data"] * sizes["fsdp"] == 1,
    f"model.remat={model_cfg.remat!r} with scanned layers, Pallas attention and rows "
    f"sharded over mesh.data*mesh.fsdp={sizes['data'] * sizes['fsdp']} aborts the TPU "
    "compiler (libtpu 0.0.42 layout-assignment check); use attention.impl=blockwise, "
    "model.remat=full, one row per context group (mesh.data=mesh.fsdp=1), or "
    "model.scan_layers=False",
  )


def _validate_anchor(config, model_cfg) -> None:
  """AnchorAttention is data and mask together: `data.position_scheme="anchor"` and `model.anchor`.

  The packer starts each row with the shared BOS anchor only under the scheme, and only the
  model's mask (`MaskSpec(anchor=True)`) shows key 0 to every document (Wang et al. 2024,
  arXiv:2411.13476; haonan3/AnchorContext `train.py`: `add_anchor_token_to_inputs` with
  `generate_doc_mask_mod`). One without the other trains something else: documents blind to
  their only BOS, or a content token shared by every document.
  """
  field = "model.anchor" if config.init_from is None else "model_overrides.anchor"
  scheme = config.data.get("position_scheme", "global")
  anchor = bool(model_cfg.get("anchor", False))
  if scheme == "anchor" and not anchor:
    require(
      "anchor" in model_cfg,
      f"data.position_scheme='anchor' needs model.anchor=True, but model.family="
      f"{model_cfg.get('family')!r} has no attention mask with an anchor; choose another "
      "data.position_scheme",
    )
    raise ConfigError(
      f"data.position_scheme='anchor' needs {field}=True (the mask that shows the row's BOS "
      f"anchor to every document); set {field}=True or choose another data.position_scheme"
    )
  require(
    scheme == "anchor" or not anchor,
    f"{field}=True needs data.position_scheme='anchor' (rows that start with the shared BOS "
    f"anchor), got {scheme!r}; set data.position_scheme='anchor' or {field}=False",
  )


def _validate_eval_tasks(ev, model_cfg) -> None:
  """eval.passkey's threshold and eval.state_norms (a Mamba-2 model, every <= length)."""
  threshold = ev.passkey.get("threshold", PASSKEY_THRESHOLD)  # a config may replace the dict
  require(
    0.0 <= threshold <= 1.0,
    f"eval.passkey.threshold={threshold} must be an accuracy in [0, 1], e.g. 0.9",
  )
  sn = ev.get("state_norms")
  if sn is None or not sn.enabled:
    return
  require(
    model_cfg.get("family") == "mamba2",
    f"eval.state_norms measures Mamba-2 SSM states, but model.family is "
    f"{model_cfg.get('family')!r}; set eval.state_norms.enabled=False",
  )
  require(
    1 <= sn.every <= sn.length,
    f"eval.state_norms.every={sn.every} must be in [1, eval.state_norms.length={sn.length}]",
  )


def _validate_rope_variants(variants, model_cfg) -> None:
  """Each `eval.rope_variants` entry is a valid rope dict (checked now, not after training)."""
  dim = head_dim(model_cfg) if model_cfg is not None and "num_heads" in model_cfg else None
  for name, rope in variants.items():
    rope = rope.to_dict() if hasattr(rope, "to_dict") else dict(rope)
    try:
      validate_rope_parameters(rope, head_dim=dim)
    except ValueError as e:
      raise ConfigError(f"eval.rope_variants.{name}: {e}") from None
