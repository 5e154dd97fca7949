"""Entropy-aware ABF from 100 samples: Llama-2-7B-Chat extended 4K → 16K in 6 steps.

Zhang, Li, Liu 2024, "Extending LLMs' Context Window with 100 Samples" (arXiv:2401.07004):
RoPE with base 500,000 (ABF) and every layer's query, but the first two, scaled by
max(1, ln(pos + 1) / ln 4096) to keep the attention entropy of Llama 2's 4K training
(lcjax: `rope_type="eabf"`, `lcjax.positional.rope_variants`); fine-tuned on 100 long
ShareGPT dialogues for 6 steps at 16,384 tokens. tests/test_recipes.py checks the config
against both tables:

| stage | seq_len | rope_theta | tokens | steps | source |
|---|---|---|---|---|---|
| 1 | 16384 | 5e5 | unpublished | 6 | abstract; base 500000 in patch/EABF.py |

| setting | value |
|---|---|
| rope_type | eabf |
| original_max_position_embeddings | 4096 |
| eabf_unscaled_layers | 2 |

Checked with the reference search: 16,384 tokens, 100 samples and 6 steps (the abstract);
the base, the query scale's ln 4096 and the two unscaled layers in GAIR-NLP/Entropy-ABF
`patch/EABF.py` (`_init_rope_new`: base=500000; `apply_rotary_pos_emb_scale`;
`apply_eabf(model, count=2)`). Not found (the search returned only the abstract), so
lcjax's choices: 16 rows per step (6 steps × 16 ≈ the 100 samples), learning rate 2e-5,
constant, no warmup.

Full size (Llama-2-7B-Chat from a Hugging Face folder; `data` a jsonl glob with a "text"
field holding the 100 dialogues, e.g. the first 100 of the authors' EABF-ShareGPT-Long-3.5k;
both are required, and loading with init_from but without data fails naming it):
  python scripts/train.py --workdir gs://BUCKET/eabf100 \\
      --config configs/recipes/eabf100.py:init_from=/models/Llama-2-7b-chat-hf,data=/data/d100.jsonl
Check that it fits (16 rows of 16K on 8 chips, 2 rows per chip):
  python scripts/train.py --config configs/recipes/eabf100.py --workdir /tmp/aot \\
      --compile_only --topology v5p:2x2x2
CPU size (quickstart model, byte tokenizer, the standard library as corpus; lengths ÷32:
stage 1 trains from scratch at 128 tokens with Llama 2's θ rescaled, standing in for
Llama 2's 4K pretraining, then the entropy-aware ABF stage at 512 for 6 steps of 16 rows,
θ 5e5 rescaled (`lcjax.recipes.scaled_rope_theta`) and the query scale's ln 4096 → ln 128,
on a stand-in for the 100 long dialogues: the standard-library training files of 512 to
1,023 bytes (one to two rows each, `data.source.min_bytes`/`max_bytes`; 108 on CPython
3.11), at a learning rate in Llama 2's ratio, `CPU_EABF_LR`):
  python scripts/train.py --config configs/recipes/eabf100.py:runlocal --workdir /tmp/eabf100
Expect perplexity at 512 tokens to change little after the 6 steps (26.12 → 26.06 at
commit ee08113, 26.60 → 26.03 at an earlier one; at this scale stage 1 already extrapolates
4× well; README, "Continual-pretraining recipes").
`smoke` is the same chain, tiny, 2 steps a stage (tests).
Arguments: runlocal, smoke, init_from, data.
"""

from lcjax.config import ConfigError, load_config, parse_arg
from lcjax.recipes import LLAMA2_7B, cpu_stage, scaled_rope_theta
from lcjax.train.config import base_config

# (seq_len, rope_theta, tokens) per stage: the first table above (tokens unpublished).
PUBLISHED = ((16384, 5e5, None),)
STEPS = 6
ORIGINAL_LENGTH = 4096  # Llama 2's training length: the query scale's ln 4096
UNSCALED_LAYERS = 2
# Llama 2's own pretraining (4K, θ 1e4; Touvron et al. 2023): the runlocal chain's stage 1.
BASE = (4096, 1e4)
ROWS = 16  # lcjax's choice: 6 steps x 16 rows ~ 100 samples
LR = 2e-5  # lcjax's choice (not found in the reference)
MODEL = dict(LLAMA2_7B, dtype="bfloat16", remat="full")  # Llama-2-7b-chat-hf
POD_CHIPS = 8
CPU_DIVISOR = 32  # runlocal lengths: 128 (stage 1), 512 (eabf)
CPU_TOKENS_PER_STEP = 8192  # stage 1; the eabf stage has ROWS rows of 512
CPU_STEPS = (120, STEPS)
CPU_LR = 2e-3  # stage 1
# The eabf stage's: 2e-5 is to Llama 2 7B's pretraining peak 3e-4 (Touvron et al. 2023,
# Tab. 1) what this is to CPU_LR. At CPU_LR itself, 6 steps from a fresh AdamW raise the
# perplexity at 512 above stage 1's (26.12 -> 26.46 at commit ee08113; 26.60 -> 35.6 at an
# earlier one, where they wrecked the model).
CPU_EABF_LR = CPU_LR * LR / 3e-4
CPU_MODEL_FIELDS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "dtype",
)


def _eabf_rope(theta: float, seq_len: int, original: int) -> dict:
  return dict(
    rope_type="eabf",
    rope_theta=theta,
    original_max_position_embeddings=original,
    eabf_unscaled_layers=UNSCALED_LAYERS,
    max_position_embeddings=seq_len,
  )


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, smoke=False, init_from="", data="")
  c = base_config()
  c.train.update(schedule="constant", warmup_steps=0, log_every=1)
  c.checkpoint.update(every_steps=3, keep=2)
  if arg.runlocal or arg.smoke:
    return _cpu(c, smoke=arg.smoke)
  if arg.init_from and not arg.data:
    raise ConfigError(
      "configs/recipes/eabf100.py:init_from=... trains on your 100 dialogues: add data=GLOB "
      "(jsonl files with a 'text' field)"
    )
  c.model.update(MODEL)
  c.init_from = arg.init_from or "<required: configs/recipes/eabf100.py:init_from=HF_FOLDER>"
  c.data.tokenizer.update(kind="hf", path=c.init_from)
  c.data.source.update(kind="jsonl", path=arg.data or "<required: eabf100.py:data=GLOB>")
  c.eval.update(every_steps=0, ppl_lengths=(PUBLISHED[-1][0],), ppl_max_documents=4)
  c.stages = tuple(
    {
      "data.seq_len": seq_len,
      "model.max_position_embeddings": seq_len,
      "model.rope": _eabf_rope(theta, seq_len, ORIGINAL_LENGTH),
      "train.batch_size": ROWS,
      "train.steps": STEPS,
      "train.lr": LR,
      "mesh.data": 1,
      "mesh.fsdp": POD_CHIPS,
      "mesh.context": 1,
    }
    for seq_len, theta, _ in PUBLISHED
  )
  return c


def _cpu(c, *, smoke: bool):
  # The quickstart's model (one home for its sizes); each stage sets its RoPE and lengths.
  quickstart = load_config("quickstart", lock=False).model
  c.model.update({k: quickstart[k] for k in CPU_MODEL_FIELDS})
  c.attention.update(block_q=128, block_kv=128)
  c.train.update(lr=CPU_LR, log_every=10)
  divisor, steps, rows = CPU_DIVISOR, CPU_STEPS, ROWS
  if smoke:  # the same chain, tiny and short: lengths 32 and 128, 2 steps a stage
    divisor, steps, rows = 4 * CPU_DIVISOR, (2, 2), 2
    # Three layers, so that one scales its query past the two unscaled ones.
    c.model.update(d_model=64, num_layers=3, mlp_dim=176)
    c.attention.update(block_q=64, block_kv=64)
  (seq_len, theta, _), (base_len, base_theta) = PUBLISHED[-1], BASE
  T = seq_len // divisor
  c.eval.update(every_steps=0, ppl_lengths=(T,), ppl_max_documents=16, ppl_protocol="truncated")
  base = cpu_stage(
    base_len,
    base_theta,
    divisor,
    steps=steps[0],
    warmup_steps=min(5, steps[0] - 1),
    tokens_per_step=CPU_TOKENS_PER_STEP,
    smoke=smoke,
  )
  base["train.schedule"] = "cosine"
  if smoke:
    c.eval.ppl_max_documents = 1
    base["eval.ppl_lengths"] = ()  # evaluate only the last stage
  eabf = {
    "data.seq_len": T,
    "model.max_position_embeddings": T,
    "model.rope": _eabf_rope(
      round(scaled_rope_theta(theta, seq_len, T), 1), T, ORIGINAL_LENGTH // divisor
    ),
    # The 100 samples: the stdlib's training files of one to two rows (108 on CPython 3.11).
    "data.mixture": [
      {
        "name": "samples",
        "weight": 1.0,
        "source": {"kind": "stdlib", "min_bytes": T, "max_bytes": 2 * T},
      }
    ],
    "train.batch_size": rows,
    "train.steps": steps[1],
    "train.lr": CPU_EABF_LR,
    "checkpoint.every_steps": max(steps[1] // 2, 1),
  }
  c.stages = (base, eabf)
  return c
