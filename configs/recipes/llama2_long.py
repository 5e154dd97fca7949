"""Llama-2-Long: continual pretraining of Llama 2 at 32K with Adjusted Base Frequency (ABF).

Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models" (arXiv:2309.16039):
Llama 2 7B/13B continue pretraining on 32,768-token sequences (34B/70B on 16,384) of the
Llama 2 data mix with long texts upsampled (ratios unpublished), with RoPE's base frequency
raised from 10,000 to 500,000 ("ABF", section "Positional Encoding"); 400B tokens in all. One
stage from the released Llama 2 (tests/test_recipes.py checks the config against this table):

| stage | seq_len | rope_theta | tokens | batch_tokens | lr | schedule | warmup_steps | source |
|---|---|---|---|---|---|---|---|---|
| 1 | 32768 | 5e5 | 400e9 | 4194304 | 2e-5 | cosine | 2000 | arXiv:2309.16039 (7B/13B) |

Checked with the reference search: the 32,768-token length of 7B/13B (16,384 for 34B/70B),
θ 10,000 → 500,000 and the 400B tokens (the abstract and two summaries of the paper). The
learning rate (2e-5 for 7B/13B; 1e-5 for 34B/70B, not offered here), the cosine schedule
with 2,000 warmup steps and the 4M-token batches are lcjax's reading of the paper
(../shared/notes/studies.md §3), not re-checked against the PDF (the search returned only
its abstract and summaries). Unstated for the continual stage, kept as in Llama 2's
pretraining (Touvron et al. 2023, §2.2): AdamW β₂ 0.95, weight decay 0.1, gradient clipping
1.0, cosine to 10%.

Full size (Llama 2 from a Hugging Face folder; `size=13b` for 13B; `data` a glob of jsonl
files with a "text" field: your long-upsampled mix; both are required to train, and
loading with init_from but without data fails naming the missing argument):
  python scripts/train.py --workdir gs://BUCKET/llama2_long \\
      --config configs/recipes/llama2_long.py:init_from=/models/Llama-2-7b-hf,data=/data/mix/*.jsonl
Check that it fits a pod (128 rows of 32K on 64 chips, 2 rows per chip):
  python scripts/train.py --config configs/recipes/llama2_long.py --workdir /tmp/aot \\
      --compile_only --topology v5p:4x4x4
CPU size (quickstart model, byte tokenizer, the standard library as the corpus; lengths
÷32: stage 1 trains from scratch at 128 tokens with Llama 2's θ rescaled, standing in for
Llama 2's 4K pretraining, then the ABF stage at 1,024 with θ 5e5 rescaled, both keeping
the critical-dimension fraction, `lcjax.recipes.scaled_rope_theta`):
  python scripts/train.py --config configs/recipes/llama2_long.py:runlocal --workdir /tmp/l2l
Expect perplexity at 1,024 tokens to fall after the ABF stage (README, "Continual-
pretraining recipes"). `smoke` is the same chain, tiny, 2 steps a stage (tests).
Arguments: runlocal, smoke, init_from, data, size (7b or 13b).
"""

from lcjax.config import ConfigError, load_config, parse_arg
from lcjax.recipes import cpu_stage
from lcjax.train.config import base_config

# (seq_len, rope_theta, tokens) per stage: the table above.
PUBLISHED = ((32768, 5e5, 400e9),)
# Llama 2's own pretraining (4K, θ 1e4; Touvron et al. 2023): the runlocal chain's stage 1.
BASE = (4096, 1e4)
TOKENS_PER_BATCH = 4 * 2**20
LR = 2e-5
WARMUP_STEPS = 2000
MODELS = {  # Llama-2-7b-hf / Llama-2-13b-hf config.json; with init_from the folder's is used
  "7b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
  "13b": dict(d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824),
}
CPU_DIVISOR = 32  # runlocal lengths: 128 (stage 1), 1024 (ABF)
CPU_TOKENS_PER_STEP = 8192
CPU_STEPS = (100, 60)  # stage 1 (pretraining stand-in), ABF stage
CPU_LR = 2e-3
CPU_MODEL_FIELDS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "dtype",
)
POD_CHIPS = 64
REQUIRED = "<required: configs/recipes/llama2_long.py:{}=...>"


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, smoke=False, init_from="", data="", size="7b")
  c = base_config()
  c.train.update(schedule="cosine", min_lr_ratio=0.1, b2=0.95, weight_decay=0.1, log_every=10)
  c.train.update(grad_clip_norm=1.0)
  c.checkpoint.update(every_steps=500, keep=2)
  if arg.runlocal or arg.smoke:
    return _cpu(c, smoke=arg.smoke)
  if arg.size not in MODELS:
    raise ConfigError(f"config arg size={arg.size!r} is unknown; use one of {', '.join(MODELS)}")
  if arg.init_from and not arg.data:
    raise ConfigError(
      "configs/recipes/llama2_long.py:init_from=... trains on your data: add data=GLOB "
      "(jsonl files with a 'text' field)"
    )
  c.model.update(
    vocab_size=32000, rms_norm_eps=1e-5, dtype="bfloat16", remat="full", **MODELS[arg.size]
  )
  # Without init_from the run fails at validation, naming the argument; AOT checks and
  # tests compile each stage without it (lcjax.sweep.stages.stage_configs).
  c.init_from = arg.init_from or REQUIRED.format("init_from")
  c.data.tokenizer.update(kind="hf", path=c.init_from)
  c.data.source.update(kind="jsonl", path=arg.data or REQUIRED.format("data"))
  c.eval.update(every_steps=0, ppl_lengths=(PUBLISHED[-1][0],), ppl_max_documents=4)
  stages = []
  for seq_len, theta, tokens in PUBLISHED:
    stages.append(
      {
        "data.seq_len": seq_len,
        "model.max_position_embeddings": seq_len,
        "model.rope": dict(rope_type="default", rope_theta=theta, max_position_embeddings=seq_len),
        "train.batch_size": TOKENS_PER_BATCH // seq_len,
        "train.steps": round(tokens / TOKENS_PER_BATCH),
        "train.lr": LR,
        "train.warmup_steps": WARMUP_STEPS,
        "mesh.data": 1,
        "mesh.fsdp": POD_CHIPS,
        "mesh.context": 1,
      }
    )
  c.stages = tuple(stages)
  return c


def _cpu(c, *, smoke: bool):
  # The quickstart's model (one home for its sizes); each stage sets its RoPE and lengths.
  quickstart = load_config("quickstart", lock=False).model
  c.model.update({k: quickstart[k] for k in CPU_MODEL_FIELDS})
  c.attention.update(block_q=128, block_kv=128)
  c.train.update(lr=CPU_LR, log_every=10)
  divisor, steps = CPU_DIVISOR, CPU_STEPS
  final = PUBLISHED[-1][0] // divisor
  c.eval.update(every_steps=0, ppl_lengths=(final,), ppl_max_documents=8, ppl_protocol="truncated")
  if smoke:  # the same chain, tiny and short: lengths 32 and 256, 2 steps a stage
    divisor, steps = 4 * CPU_DIVISOR, (2, 2)
    c.model.update(d_model=64, num_layers=2, mlp_dim=176)
    c.attention.update(block_q=64, block_kv=64)
    c.eval.update(ppl_lengths=(PUBLISHED[-1][0] // divisor,), ppl_max_documents=1)
  # The ABF stage's warmup is the published share of its steps (2,000 of ~95K), at least 1.
  warmup_share = WARMUP_STEPS / round(PUBLISHED[-1][2] / TOKENS_PER_BATCH)
  stages = []
  lengths = [(BASE[0], BASE[1], 5), *[(s, t, None) for s, t, _ in PUBLISHED]]
  for (seq_len, theta, warmup), n in zip(lengths, steps, strict=True):
    stage = cpu_stage(
      seq_len,
      theta,
      divisor,
      steps=n,
      warmup_steps=min(n - 1, warmup if warmup else max(1, round(warmup_share * n))),
      tokens_per_step=CPU_TOKENS_PER_STEP,
      smoke=smoke,
    )
    if smoke and not stages:  # evaluate only the last stage
      stage["eval.ppl_lengths"] = ()
    stages.append(stage)
  c.stages = tuple(stages)
  return c
