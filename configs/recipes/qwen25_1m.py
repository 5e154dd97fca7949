"""Qwen2.5-1M: progressive context extension 4K → 256K with a larger RoPE θ per stage.

Yang et al. 2025, "Qwen2.5-1M Technical Report" (arXiv:2501.15383), long-context
pretraining in five stages, the first two Qwen2.5's own pretraining (4K, then 32K with ABF
raising θ from 10,000 to 1,000,000), then 64K, 128K and 256K with θ 1e6, 5e6 and 1e7; in
those three, 75% of the data is at the stage's length and 25% is shorter, to keep short-
context quality. tests/test_recipes.py checks the config against this table:

| stage | seq_len | rope_theta | tokens | long_fraction | source |
|---|---|---|---|---|---|
| 1 | 4096 | 1e4 | unpublished | — | Qwen2.5 pretraining |
| 2 | 32768 | 1e6 | unpublished | — | Qwen2.5 pretraining, ABF |
| 3 | 65536 | 1e6 | unpublished | 0.75 | report, via summary |
| 4 | 131072 | 5e6 | unpublished | 0.75 | report, via summary |
| 5 | 262144 | 1e7 | unpublished | 0.75 | report, via summary |

Checked with the reference search: 4K → 256K in stages and θ 10,000 → 10,000,000 with ABF
(the Qwen blog post, QwenLM/qwenlm.github.io content/blog/qwen2.5-1m/index.md); the five
lengths, the θ of each stage and the 75%/25% mix come from a summary of the report
(MaoSong2022.github.io content/post/qwen2_5_1M/index.md), not from the report's PDF, which
the search did not return. Unpublished, so lcjax's choices: the token counts (`steps=`
steps of 4M tokens per stage at full size, default 1,000), the learning rate (1e-5, cosine
to 0.1× after a 10% warmup, AdamW as ProLong's), global positions with document masks, and
"shorter" read as documents shorter than the stage's length packed into its rows (a
`data.mixture` of a "long" source, weight 0.75, and a "short" one, 0.25).

Full size (Qwen2.5-7B from a Hugging Face folder; the released base model has finished
stage 2, so start at stage 3 with `start_stage=3`; data: `pretrain` (stages 1-2), `long_64k`,
`long_128k`, `long_256k` (documents of at least that many tokens) and `short` (shorter ones),
jsonl globs with a "text" field; loading with init_from but without a stage's data fails
naming the argument):
  python scripts/train.py --workdir gs://BUCKET/qwen1m --config configs/recipes/qwen25_1m.py:\\
init_from=/models/Qwen2.5-7B,start_stage=3,long_64k=/d/64k/*.jsonl,long_128k=/d/128k/*.jsonl,\\
long_256k=/d/256k/*.jsonl,short=/d/short/*.jsonl
Check the 256K stage fits a pod (16 rows of 256K; context 4, fsdp 16, 64K tokens per chip):
  python scripts/train.py --config configs/recipes/qwen25_1m.py --workdir /tmp/aot \\
      --compile_only --topology v5p:4x4x4
CPU size (quickstart model, byte tokenizer, the standard library as corpus, trained from
scratch: stage 1 stands in for Qwen2.5's 4K pretraining; lengths ÷128 = 32 … 2,048, θ
rescaled to keep each stage's critical-dimension fraction, `lcjax.recipes.scaled_rope_theta`;
in stages 3-5 the "long" source is the stdlib files of at least the stage's length in bytes
and the "short" one the files of 128 bytes up to it, `data.source.min_bytes`/`max_bytes`):
  python scripts/train.py --config configs/recipes/qwen25_1m.py:runlocal --workdir /tmp/qwen1m
Expect perplexity at 2,048 tokens to end a fifth to a quarter below stage 1's, stage 2's θ jump
costing a little first (README, "Continual-pretraining recipes"). `smoke` is the same chain,
tiny, 2 steps a stage (tests).
Arguments: runlocal, smoke, init_from, start_stage, steps, pretrain, long_64k, long_128k,
long_256k, short.
"""

from lcjax.config import ConfigError, load_config, parse_arg
from lcjax.recipes import cpu_stage
from lcjax.train.config import base_config

# (seq_len, rope_theta, tokens) per stage: the table above (tokens unpublished).
PUBLISHED = (
  (4096, 1e4, None),
  (32768, 1e6, None),
  (65536, 1e6, None),
  (131072, 5e6, None),
  (262144, 1e7, None),
)
LONG_FRACTION = 0.75  # stages 3-5: at the stage's length; the rest shorter
FIRST_MIXED_STAGE = 3
TOKENS_PER_BATCH = 4 * 2**20  # lcjax's choice (unpublished)
LR = 1e-5  # lcjax's choice (unpublished)
WARMUP_RATIO = 0.1
DATA_ARGS = ("pretrain", "pretrain", "long_64k", "long_128k", "long_256k")  # per stage
MODEL = dict(  # Qwen2.5-7B config.json; with init_from the folder's is used
  hf_model_type="qwen2",
  vocab_size=152064,
  d_model=3584,
  num_layers=28,
  num_heads=28,
  num_kv_heads=4,
  mlp_dim=18944,
  rms_norm_eps=1e-6,
  qkv_bias=True,
  dtype="bfloat16",
  remat="full",
)
POD_CHIPS = 64
POD_TOKENS_PER_CHIP = 65536
CPU_DIVISOR = 128  # runlocal lengths: 32, 256, 512, 1024, 2048
CPU_TOKENS_PER_STEP = 8192
CPU_STEPS = (40, 30, 24, 16, 12)  # lcjax's choice: the published counts are unknown
CPU_LR = 2e-3
CPU_SHORT_MIN_BYTES = 128
CPU_MODEL_FIELDS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "dtype",
)


def get_config(arg=None):
  data = {name: "" for name in dict.fromkeys((*DATA_ARGS, "short"))}
  arg = parse_arg(arg, runlocal=False, smoke=False, init_from="", start_stage=1, steps=1000, **data)
  c = base_config()
  c.data.update(position_scheme="global", loss_weighting="token")
  c.train.update(schedule="cosine", min_lr_ratio=0.1, b2=0.95, weight_decay=0.1, log_every=10)
  c.checkpoint.update(every_steps=200, keep=2)
  if arg.runlocal or arg.smoke:
    return _cpu(c, smoke=arg.smoke)
  if not 1 <= arg.start_stage <= len(PUBLISHED):
    raise ConfigError(f"config arg start_stage={arg.start_stage} must be in 1..{len(PUBLISHED)}")
  if arg.steps < 1:
    raise ConfigError(f"config arg steps={arg.steps} must be >= 1 (steps per stage)")
  first = arg.start_stage - 1
  needed = list(dict.fromkeys((*DATA_ARGS[first:], "short")))  # the last stage mixes in short
  missing = [name for name in needed if not arg[name]]
  if arg.init_from and missing:
    raise ConfigError(
      f"configs/recipes/qwen25_1m.py:init_from=... trains on your data: set {missing[0]}=GLOB "
      f"(jsonl files with a 'text' field; missing: {', '.join(missing)})"
    )
  path = {n: arg[n] or f"<required: configs/recipes/qwen25_1m.py:{n}=GLOB>" for n in data}
  c.model.update(MODEL)
  c.init_from = arg.init_from or "<required: configs/recipes/qwen25_1m.py:init_from=HF_FOLDER>"
  c.data.tokenizer.update(kind="hf", path=c.init_from)
  c.data.source.update(kind="jsonl", path=path[DATA_ARGS[-1]])  # held-out 256K documents
  c.eval.update(every_steps=0, ppl_lengths=(PUBLISHED[-1][0],), ppl_max_documents=4)
  c.train.update(lr=LR, steps=arg.steps, warmup_steps=round(WARMUP_RATIO * arg.steps))
  stages = []
  for k, (seq_len, theta, _) in enumerate(PUBLISHED):
    if k < first:
      continue
    context = max(1, seq_len // POD_TOKENS_PER_CHIP)
    stage = {
      "data.seq_len": seq_len,
      "model.max_position_embeddings": seq_len,
      "model.rope": dict(rope_type="default", rope_theta=theta, max_position_embeddings=seq_len),
      "train.batch_size": TOKENS_PER_BATCH // seq_len,
      "mesh.data": 1,
      "mesh.fsdp": POD_CHIPS // context,
      "mesh.context": context,
    }
    source = {"kind": "jsonl", "path": path[DATA_ARGS[k]]}
    if k + 1 >= FIRST_MIXED_STAGE:
      stage["data.mixture"] = _mixture(source, {"kind": "jsonl", "path": path["short"]})
    else:
      stage.update({"data.source.kind": "jsonl", "data.source.path": source["path"]})
    stages.append(stage)
  c.stages = tuple(stages)
  return c


def _mixture(long_source: dict, short_source: dict) -> list[dict]:
  """75% of the rows from documents at the stage's length, 25% from shorter ones."""
  return [
    {"name": "long", "weight": LONG_FRACTION, "source": long_source},
    {"name": "short", "weight": 1 - LONG_FRACTION, "source": short_source},
  ]


def _cpu(c, *, smoke: bool):
  # The quickstart's model (one home for its sizes); each stage sets its RoPE and lengths.
  quickstart = load_config("quickstart", lock=False).model
  c.model.update({k: quickstart[k] for k in CPU_MODEL_FIELDS})
  c.attention.update(block_q=128, block_kv=128)
  c.train.update(lr=CPU_LR, log_every=10)
  divisor, steps = CPU_DIVISOR, CPU_STEPS
  final = PUBLISHED[-1][0] // divisor
  c.eval.update(every_steps=0, ppl_lengths=(final,), ppl_max_documents=16, ppl_protocol="truncated")
  if smoke:  # the same chain, tiny and short: lengths 8 ... 512, 2 steps a stage
    divisor, steps = 4 * CPU_DIVISOR, (2,) * len(PUBLISHED)
    c.model.update(d_model=64, num_layers=2, mlp_dim=176)
    c.attention.update(block_q=64, block_kv=64)
    c.eval.update(ppl_lengths=(PUBLISHED[-1][0] // divisor,), ppl_max_documents=1)
  stages = []
  for k, ((seq_len, theta, _), n) in enumerate(zip(PUBLISHED, steps, strict=True)):
    T = seq_len // divisor
    stage = cpu_stage(
      seq_len,
      theta,
      divisor,
      steps=n,
      warmup_steps=min(n - 1, max(1, round(WARMUP_RATIO * n))),
      tokens_per_step=CPU_TOKENS_PER_STEP,
      smoke=smoke,
    )
    if k + 1 >= FIRST_MIXED_STAGE:
      stage["data.mixture"] = _mixture(
        {"kind": "stdlib", "min_bytes": T},
        {"kind": "stdlib", "min_bytes": min(CPU_SHORT_MIN_BYTES, T // 2), "max_bytes": T},
      )
    if smoke and k < len(PUBLISHED) - 1:  # evaluate only the last stage
      stage["eval.ppl_lengths"] = ()
    stages.append(stage)
  c.stages = tuple(stages)
  return c
