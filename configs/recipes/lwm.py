"""LWM-Text: progressive context extension 32K → 1M with a larger RoPE θ per stage.

Liu, Yan, Zaharia, Abbeel 2024, "World Model on Million-Length Video and Language with
Blockwise RingAttention" (arXiv:2402.08268), Table 1 (LWM-Text), as five stages from
Llama-2-7B, with masked sequence packing (document masks) and LWM's loss weighting
(every packed document weighs what it would weigh unpacked: `data.loss_weighting=
"document"`). Published numbers, one row per stage (tests/test_recipes.py checks the
config against this table):

| stage | seq_len | rope_theta | tokens | source |
|---|---|---|---|---|
| 1 | 32768 | 1e6 | 4.8e9 | Tab. 1 |
| 2 | 131072 | 1e7 | 12e9 | Tab. 1; θ as in LWM's scripts/run_eval_needle.sh (128K model) |
| 3 | 262144 | 1e7 | 12e9 | Tab. 1 |
| 4 | 524288 | 2.5e7 | 3e9 | Tab. 1 |
| 5 | 1048576 | 5e7 | 1.8e9 | Tab. 1; θ as in LWM-Text-Chat-1M's config.json |

4M tokens per batch in every stage; constant learning rate 4e-5 (Tab. 1). The θ of the
128K and 1M stages are checked against LWM's released files; the others, the token
counts and the learning rate are lcjax's reading of Table 1 (../shared/notes/studies.md
§3), not re-checked against the PDF (the reference search returned only its abstract).

Full size (Llama-2-7B from a Hugging Face folder; 4M-token batches; 64K tokens per chip
on 64 chips, the context axis growing with the stage):
  python scripts/train.py --config configs/recipes/lwm.py:init_from=/models/Llama-2-7b-hf \\
      --workdir gs://BUCKET/lwm --config.data.source.kind=jsonl \\
      --config.data.source.path='/data/books/*.jsonl'
Check the largest stage (1M tokens × 4 rows) fits a pod before paying for it:
  python scripts/train.py --config configs/recipes/lwm.py --workdir /tmp/aot \\
      --compile_only --topology v5p:4x4x4
CPU size (quickstart model, byte tokenizer, the standard library as the corpus; lengths
÷256 = 128…4096, θ rescaled to keep each stage's critical-dimension fraction,
`lcjax.recipes.scaled_rope_theta`; 150 steps in Table 1's token ratios, 8,192 tokens a
step; trained from scratch, so stage 1 is also its pretraining):
  python scripts/train.py --config configs/recipes/lwm.py:runlocal --workdir /tmp/lwm
Expect perplexity at 4,096 tokens to end at about half of stage 1's, though the two short
last stages end above stage 3 (README, "Continual-pretraining recipes"). `smoke` is the
same chain, tiny, at lengths ÷2048 with 2 steps a stage (tests).
Arguments: runlocal, smoke, init_from (a Hugging Face folder; required at full size).
"""

from lcjax.config import load_config, parse_arg
from lcjax.recipes import LLAMA2_7B, cpu_stage, steps_in_ratio
from lcjax.train.config import base_config

# (seq_len, rope_theta, tokens) per stage: the table above.
PUBLISHED = (
  (32768, 1e6, 4.8e9),
  (131072, 1e7, 12e9),
  (262144, 1e7, 12e9),
  (524288, 2.5e7, 3e9),
  (1048576, 5e7, 1.8e9),
)
TOKENS_PER_BATCH = 4 * 2**20
LR = 4e-5
CPU_DIVISOR = 256  # runlocal lengths: 128 ... 4096
CPU_TOKENS_PER_STEP = 8192
CPU_STEPS = 150
CPU_MODEL_FIELDS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "dtype",
)
POD_TOKENS_PER_CHIP = 65536
POD_CHIPS = 64


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, smoke=False, init_from="")
  small = arg.runlocal or arg.smoke
  c = base_config()
  c.data.update(position_scheme="global", loss_weighting="document")
  c.train.update(schedule="constant", weight_decay=0.0, log_every=10)
  c.checkpoint.update(every_steps=200, keep=2)
  if small:
    return _cpu(c, smoke=arg.smoke)
  c.model.update(LLAMA2_7B, dtype="bfloat16", remat="full")  # init_from's config wins
  c.train.update(lr=LR, warmup_steps=0)
  c.eval.update(every_steps=0, ppl_lengths=(PUBLISHED[-1][0],), ppl_max_documents=4)
  c.parallel.update(context_strategy="ring", layout="zigzag")
  if arg.init_from:
    c.init_from = arg.init_from
    c.data.tokenizer.update(kind="hf", path=arg.init_from)
  stages = []
  for seq_len, theta, tokens in PUBLISHED:
    rows = TOKENS_PER_BATCH // seq_len
    context = max(1, seq_len // POD_TOKENS_PER_CHIP)
    stages.append(
      {
        "data.seq_len": seq_len,
        "model.max_position_embeddings": seq_len,
        "model.rope": dict(rope_type="default", rope_theta=theta, max_position_embeddings=seq_len),
        "train.batch_size": rows,
        "train.steps": round(tokens / TOKENS_PER_BATCH),
        "mesh.data": 1,
        "mesh.fsdp": POD_CHIPS // context,
        "mesh.context": context,
      }
    )
  c.stages = tuple(stages)
  return c


def _cpu(c, *, smoke: bool):
  # The quickstart's model (one home for its sizes); each stage sets its RoPE and lengths.
  quickstart = load_config("quickstart", lock=False).model
  c.model.update({k: quickstart[k] for k in CPU_MODEL_FIELDS})
  c.attention.update(block_q=128, block_kv=128)
  c.train.update(lr=2e-3, warmup_steps=5, log_every=10)
  final = PUBLISHED[-1][0] // CPU_DIVISOR
  c.eval.update(every_steps=0, ppl_lengths=(final,), ppl_max_documents=4, ppl_protocol="truncated")
  divisor = CPU_DIVISOR
  if smoke:  # the same chain, tiny and short: lengths 16 ... 512, 2 steps a stage
    divisor = 8 * CPU_DIVISOR
    c.model.update(d_model=64, num_layers=2, mlp_dim=176)
    c.attention.update(block_q=64, block_kv=64)
    steps = (2,) * len(PUBLISHED)
    c.eval.update(ppl_lengths=(64,), ppl_max_documents=1)
  else:
    steps = steps_in_ratio([tokens for _, _, tokens in PUBLISHED], CPU_STEPS)
  stages = []
  for (seq_len, theta, _), n in zip(PUBLISHED, steps, strict=True):
    stages.append(
      cpu_stage(
        seq_len,
        theta,
        divisor,
        steps=n,
        warmup_steps=min(5, n - 1),
        tokens_per_step=CPU_TOKENS_PER_STEP,
        smoke=smoke,
      )
    )
    if smoke and len(stages) < len(PUBLISHED):  # evaluate only the last stage
      stages[-1]["eval.ppl_lengths"] = ()
  c.stages = tuple(stages)
  return c
