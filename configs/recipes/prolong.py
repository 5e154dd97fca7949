"""ProLong: Llama-3-8B-Instruct continually pretrained at 64K, then at 512K.

Gao, Wettig, Yen, Chen 2024, "How to Train Long-Context Language Models (Effectively)"
(arXiv:2410.02660), as released in princeton-nlp/ProLong: `train_64K.sh` (5,000 steps of
64 × 64K tokens, RoPE θ 8e6) and `train_512K.sh` (2,500 steps of 128 × 512K / 8 (sequence
parallel) = 16 × 512K tokens, θ 1.28e8, "Initialize model + optimizer state with
ProLong64K": `train.carry_optimizer_state`). Both: AdamW β₁ 0.9, β₂ 0.95, weight decay 0.1,
gradient clipping 1.0, cosine schedule to 0.1× (`--min_lr_ratio 0.1`) after a 10% warmup
(`--warmup_ratio 0.1`). Rotary positions are continuous over a packed row, attention is per
document (training/modeling_flash_llama.py, `LlamaAttention.forward`: the rotary embedding
runs over the whole row, "we don't use the unpadded_length during rotary embeds", and
`flash_attn_varlen_kvpacked_func` masks documents): `data.position_scheme="global"`. The loss
is the mean over the batch's tokens (`LlamaForCausalLM.forward`: each logit block's loss
weighted by its share of the valid labels): `data.loss_weighting="token"`.
tests/test_recipes.py checks the config against the three tables (stage 1: train_64K.sh,
stage 2: train_512K.sh):

| stage | seq_len | rope_theta | tokens | batch_tokens | steps | lr | warmup_steps | optimizer |
|---|---|---|---|---|---|---|---|---|
| 1 | 65536 | 8e6 | 20971520000 | 4194304 | 5000 | 1e-5 | 500 | new |
| 2 | 524288 | 1.28e8 | 20971520000 | 8388608 | 2500 | 5e-6 | 250 | carried |

| setting | value |
|---|---|
| schedule | cosine |
| min_lr_ratio | 0.1 |
| b1 | 0.9 |
| b2 | 0.95 |
| weight_decay | 0.1 |
| grad_clip_norm | 1.0 |
| position_scheme | global |
| loss_weighting | token |

The data mix by source (the reference's dataset folder names and `@fraction`s; "—": not in
that stage):

| source name | stage 1 | stage 2 |
|---|---|---|
| thestackv1_concat_by_repo-65536 | 0.3 | — |
| book-65536 | 0.3 | — |
| thestackv1_concat_by_repo2-524288 | — | 0.15 |
| thestackv1_concat_by_repo2-65536 | — | 0.15 |
| book2-524288 | — | 0.05 |
| book2-65536 | — | 0.25 |
| fineweb-edu | 0.1 | 0.1 |
| fineweb-2023-50 | 0.1 | 0.1 |
| stackexchange | 0.04 | 0.04 |
| dolmawiki | 0.04 | 0.04 |
| tuluv2 | 0.03 | 0.03 |
| arxiv | 0.03 | 0.03 |
| openwebmath | 0.03 | 0.03 |
| textbooks | 0.03 | 0.03 |

Every number above was read in train_64K.sh and train_512K.sh, the position scheme and the
loss in training/modeling_flash_llama.py (princeton-nlp/ProLong, through the reference
search); `--min_lr_ratio` is training/trainer.py's `min_lr_bound` (cosine to 0.1×). The
reference trains on tokenized MDS shards; lcjax reads text, so convert each source folder to
jsonl (a "text" field) first.

Full size (Llama-3-8B-Instruct from a Hugging Face folder; each source's path is a config
argument named as the source, by default DIR/<source>/*.jsonl under `data_64k=DIR` (the
64K-stage and short sources) or `data_512k=DIR` (the 512K-stage long sources); loading
with init_from but a source without data fails naming it):
  python scripts/train.py --workdir gs://BUCKET/prolong --config \\
      configs/recipes/prolong.py:init_from=/models/Meta-Llama-3-8B-Instruct,data_64k=/data/prolong-64K,data_512k=/data/prolong-512K
Check the 512K stage fits a pod (16 rows of 512K as 2 accumulated halves; context 8 as
the reference's sequence parallelism, fsdp 8, 64K tokens per chip):
  python scripts/train.py --config configs/recipes/prolong.py --workdir /tmp/aot \\
      --compile_only --topology v5p:4x4x4
CPU size (quickstart model, byte tokenizer, trained from scratch so stage 1 is also its
pretraining; lengths ÷256 = 256 and 2,048, θ rescaled to keep each stage's critical-
dimension fraction, `lcjax.recipes.scaled_rope_theta`; steps, tokens per step and learning
rates in the published ratios 2:1, 1:2 and 2:1; stand-in sources from the standard library
by file size (`data.source.min_bytes`/`max_bytes`): a "-65536" source is the files of at
least 256 bytes (one stage-1 row), a "-524288" source those of at least 2,048, and every
short source the files of 128–1,023 bytes, each its own shuffled stream under the
reference's name and fraction):
  python scripts/train.py --config configs/recipes/prolong.py:runlocal --workdir /tmp/prolong
Expect perplexity at 2,048 tokens to fall after the 512K-equivalent stage (README,
"Continual-pretraining recipes"). `smoke` is the same chain, tiny, 2 steps a stage (tests).
Arguments: runlocal, smoke, init_from, data_64k, data_512k, and one per source name.
"""

from lcjax.config import ConfigError, load_config, parse_arg
from lcjax.recipes import cpu_stage
from lcjax.train.config import base_config

# (seq_len, rope_theta, tokens) per stage: the first table above.
PUBLISHED = ((65536, 8e6, 5000 * 2**22), (524288, 1.28e8, 2500 * 2**23))
TOKENS_PER_STEP = (2**22, 2**23)
STEPS = (5000, 2500)
LRS = (1e-5, 5e-6)
WARMUP_RATIO = 0.1
SHORT = {  # the short sources, the same fractions in both stages
  "fineweb-edu": 0.1,
  "fineweb-2023-50": 0.1,
  "stackexchange": 0.04,
  "dolmawiki": 0.04,
  "tuluv2": 0.03,
  "arxiv": 0.03,
  "openwebmath": 0.03,
  "textbooks": 0.03,
}
# Long sources per stage: name -> (fraction, shortest document in tokens at full size).
LONG = (
  {"thestackv1_concat_by_repo-65536": (0.3, 65536), "book-65536": (0.3, 65536)},
  {
    "thestackv1_concat_by_repo2-524288": (0.15, 524288),
    "thestackv1_concat_by_repo2-65536": (0.15, 65536),
    "book2-524288": (0.05, 524288),
    "book2-65536": (0.25, 65536),
  },
)
SOURCES = (*LONG[0], *LONG[1], *SHORT)
MODEL = dict(  # Meta-Llama-3-8B-Instruct config.json; with init_from the folder's is used
  vocab_size=128256,
  d_model=4096,
  num_layers=32,
  num_heads=32,
  num_kv_heads=8,
  mlp_dim=14336,
  rms_norm_eps=1e-5,
  dtype="bfloat16",
  remat="full",
)
POD_CHIPS = 64
POD_TOKENS_PER_CHIP = 65536
CPU_DIVISOR = 256  # runlocal lengths: 256, 2048
CPU_TOKENS_PER_STEP = (4096, 8192)
CPU_STEPS = (60, 30)
CPU_LRS = (2e-3, 1e-3)
CPU_SHORT_BYTES = (128, 1024)  # the short stand-ins: files of 128-1,023 bytes
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
  paths = {name: "" for name in SOURCES}
  arg = parse_arg(
    arg, runlocal=False, smoke=False, init_from="", data_64k="", data_512k="", **paths
  )
  c = base_config()
  c.data.update(position_scheme="global", loss_weighting="token")
  c.train.update(
    schedule="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0
  )
  c.train.log_every = 10
  c.checkpoint.update(every_steps=125, keep=2)  # the reference's --save_steps 125
  if arg.runlocal or arg.smoke:
    return _cpu(c, smoke=arg.smoke)
  paths = {name: _source_path(arg, name) for name in SOURCES}
  missing = [name for name, path in paths.items() if path is None]
  if arg.init_from and missing:
    raise ConfigError(
      f"configs/recipes/prolong.py:init_from=... trains on ProLong's sources; set data_64k=DIR "
      f"and data_512k=DIR (DIR/<source>/*.jsonl) or a glob per source, e.g. {missing[0]}=GLOB "
      f"(missing: {', '.join(missing)})"
    )
  paths = {
    name: path or f"<required: configs/recipes/prolong.py:{name}=GLOB>"
    for name, path in paths.items()
  }
  c.model.update(MODEL)
  c.init_from = arg.init_from or "<required: configs/recipes/prolong.py:init_from=HF_FOLDER>"
  c.data.tokenizer.update(kind="hf", path=c.init_from)
  # Perplexity on the held-out documents of the 64K books (the hash split keeps them out of
  # the mixture's train split).
  c.data.source.update(kind="jsonl", path=paths["book-65536"])
  c.eval.update(every_steps=0, ppl_lengths=(PUBLISHED[-1][0],), ppl_max_documents=4)
  stages = []
  for k, (seq_len, theta, _) in enumerate(PUBLISHED):
    rows = TOKENS_PER_STEP[k] // seq_len
    context = max(1, seq_len // POD_TOKENS_PER_CHIP)
    # Rows per micro-batch: one per fsdp group (ProLong's 512K stage accumulates likewise).
    accum = max(1, rows * context // POD_CHIPS)
    mixture = [
      {"name": name, "weight": fraction, "source": {"kind": "jsonl", "path": paths[name]}}
      for name, (fraction, _) in {**LONG[k], **{n: (w, 0) for n, w in SHORT.items()}}.items()
    ]
    stages.append(
      {
        "data.seq_len": seq_len,
        "data.mixture": mixture,
        "model.max_position_embeddings": seq_len,
        "model.rope": dict(rope_type="default", rope_theta=theta, max_position_embeddings=seq_len),
        "train.batch_size": rows,
        "train.grad_accum": accum,
        "train.steps": STEPS[k],
        "train.lr": LRS[k],
        "train.warmup_steps": round(WARMUP_RATIO * STEPS[k]),
        "train.carry_optimizer_state": k > 0,
        "mesh.data": 1,
        "mesh.fsdp": POD_CHIPS // context,
        "mesh.context": context,
      }
    )
  c.stages = tuple(stages)
  return c


def _source_path(arg, name: str) -> str | None:
  """The glob of source `name`: its own argument, else DIR/<name>/*.jsonl under its root
  (data_512k for the 512K stage's long sources, as in train_512K.sh; data_64k otherwise)."""
  if arg[name]:
    return arg[name]
  root = arg.data_512k if name in LONG[1] else arg.data_64k
  return f"{root.rstrip('/')}/{name}/*.jsonl" if root else None


def _cpu(c, *, smoke: bool):
  # The quickstart's model (one home for its sizes); each stage sets its RoPE and lengths.
  quickstart = load_config("quickstart", lock=False).model
  c.model.update({k: quickstart[k] for k in CPU_MODEL_FIELDS})
  c.attention.update(block_q=128, block_kv=128)
  divisor, steps = CPU_DIVISOR, CPU_STEPS
  final = PUBLISHED[-1][0] // divisor
  c.eval.update(every_steps=0, ppl_lengths=(final,), ppl_max_documents=16, ppl_protocol="truncated")
  if smoke:  # the same chain, tiny and short: lengths 32 and 256, 2 steps a stage
    divisor, steps = 8 * CPU_DIVISOR, (2, 2)
    c.model.update(d_model=64, num_layers=2, mlp_dim=176)
    c.attention.update(block_q=64, block_kv=64)
    c.eval.update(ppl_lengths=(PUBLISHED[-1][0] // divisor,), ppl_max_documents=1)
  short = dict(zip(("min_bytes", "max_bytes"), CPU_SHORT_BYTES, strict=True))
  stages = []
  for k, ((seq_len, theta, _), n) in enumerate(zip(PUBLISHED, steps, strict=True)):
    mixture = [
      {
        "name": name,
        "weight": fraction,
        "source": {"kind": "stdlib", "min_bytes": shortest // CPU_DIVISOR},
      }
      for name, (fraction, shortest) in LONG[k].items()
    ] + [
      {"name": name, "weight": fraction, "source": {"kind": "stdlib", **short}}
      for name, fraction in SHORT.items()
    ]
    stage = cpu_stage(
      seq_len,
      theta,
      divisor,
      steps=n,
      warmup_steps=min(n - 1, max(1, round(WARMUP_RATIO * n))),
      tokens_per_step=CPU_TOKENS_PER_STEP[k],
      smoke=smoke,
    )
    stage.update(
      {"data.mixture": mixture, "train.lr": CPU_LRS[k], "train.carry_optimizer_state": k > 0}
    )
    if smoke and k < len(PUBLISHED) - 1:  # evaluate only the last stage
      stage["eval.ppl_lengths"] = ()
    stages.append(stage)
  c.stages = tuple(stages)
  return c
