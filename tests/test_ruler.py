"""RULER tasks (lcjax.eval.ruler*): prompt budgets, answers, seeds, scorers, oracle and uniform
models, greedy decoding vs. teacher forcing, outputs, one-line errors, and scripts/eval.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lcjax.config import ConfigError
from lcjax.data.tokenizers import ByteTokenizer, HFTokenizer
from lcjax.eval import ruler
from lcjax.eval.ruler_data import TASKS, RulerError, TaskTooShort, load_qa_jsonl
from lcjax.eval.ruler_run import evaluate_run
from lcjax.eval.ruler_score import (
  gold_tokens,
  greedy_generate,
  leading_matches,
  model_forward,
  score_generations,
  string_match_all,
  string_match_part,
  teacher_forced,
)
from lcjax.eval.ruler_tasks import make_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (1024, 4096, 16384)


def _write_qa(path, rows=40):
  """A SQuAD-style JSONL file: `rows` questions over paragraphs of 8 articles."""
  rng = np.random.default_rng(0)
  words = "river castle engine harbor violin orbit lantern meadow copper signal".split()
  with open(path, "w") as f:
    for i in range(rows):
      answer = f"{words[i % 10]} {1000 + i}"
      body = " ".join(rng.choice(words, size=40))
      context = f"Paragraph {i}. {body}. The keeper of record {i} is {answer}. {body}."
      row = dict(
        title=f"article {i % 8}",
        context=context,
        question=f"Who is the keeper of record {i}?",
        answers={"text": [answer, answer.upper()], "answer_start": [0, 0]},
      )
      f.write(json.dumps(row) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
  return _write_qa(tmp_path_factory.mktemp("qa") / "squad.jsonl")


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
  """A byte-level BPE tokenizer.json (vocab 600) with bos/eos/pad, trained here."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  folder = tmp_path_factory.mktemp("hf_tok")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  text = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "One of the special magic numbers for quiet-river is: 1234567. VAR ABCDE = VAR FGHIJ",
  ]
  with open(os.path.join(os.path.dirname(os.__file__), "argparse.py")) as f:
    text += f.read().splitlines()
  tok.train_from_iterator(text * 3, trainer)
  tok.save(str(folder / "tokenizer.json"))
  names = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
  (folder / "tokenizer_config.json").write_text(json.dumps(names))
  return folder


def _tokenizer(kind, folder):
  return ByteTokenizer() if kind == "byte" else HFTokenizer(str(folder))


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_every_task_fits_one_unit_holds_its_answers_and_repeats_per_seed(
  kind, hf_tokenizer_folder, qa_file
):
  tok = _tokenizer(kind, hf_tokenizer_folder)
  fitted = {}
  for task in TASKS:
    for length in LENGTHS:
      try:
        samples = make_samples(task, tok, length, 2, seed=3, qa_path=qa_file)
      except TaskTooShort as e:  # the template alone overflows: a one-line error naming length
        assert "\n" not in str(e) and f"length={length}" in str(e), e
        assert length < 16384, f"{task} must fit 16K tokens ({kind}): {e}"
        continue
      fitted[task, length] = samples
      for s in samples:
        gen = s.tokens_to_generate
        assert s.prompt_ids.size + gen <= length
        # Within one haystack unit: the same sample with one more unit overflows.
        if s.index == 0:  # the second sample's size comes from the same search
          (bigger,) = make_samples(
            task, tok, length, 1, seed=3, qa_path=qa_file, units=s.haystack_units + 1
          )
          assert bigger.prompt_ids.size + gen > length, (task, length)
          assert bigger.prompt_ids.size > s.prompt_ids.size
        # The gold answers are in the prompt, at the recorded token positions.
        ids = list(s.prompt_ids)
        for answer, pos in zip(s.answers, s.needle_positions, strict=True):
          if task == "qa":
            assert any(a in s.prompt for a in s.answers)
            break
          assert answer in s.prompt, (task, answer)
          assert 0 < pos < s.prompt_ids.size
          assert answer[:3] in tok.decode(ids[pos : pos + len(answer) + 2]), (task, answer)
        assert s.prompt.endswith(s.answer_prefix) and s.answer_prefix
  assert len({t for t, _ in fitted}) == len(TASKS)
  # Reproducible per seed; another seed gives other prompts.
  again = make_samples("niah_multivalue", tok, 4096, 2, seed=3)
  assert [s.prompt for s in again] == [s.prompt for s in fitted["niah_multivalue", 4096]]
  other = make_samples("niah_multivalue", tok, 4096, 2, seed=4)
  assert other[0].prompt != again[0].prompt


def test_templates_needles_and_depth_grid_follow_ruler():
  tok = ByteTokenizer()
  (s,) = make_samples("niah_single_1", tok, 1024, 1, seed=0, depths=[50])
  assert s.prompt.startswith("A special magic number is hidden within the following text.")
  key = s.prompt.split("One of the special magic numbers for ")[1].split(" is: ")[0]
  assert s.prompt.endswith(
    f"What is the special magic number for {key} mentioned in the provided text? The special "
    f"magic number for {key} mentioned in the provided text is"
  )
  assert f"for {key} is: {s.answers[0]}." in s.prompt and s.gold == [f" {s.answers[0]}."]
  positions = []
  for depth in (0, 50, 100):
    (s,) = make_samples("niah_single_2", tok, 2048, 1, seed=0, depths=[depth])
    assert s.depths[0] == depth
    positions.append(s.needle_positions[0])
  assert positions[0] < positions[1] < positions[2]
  (v,) = make_samples("niah_multivalue", tok, 2048, 1, seed=0)
  assert "Some special magic numbers are hidden" in v.prompt and len(v.answers) == 4
  assert v.gold[0].endswith(f", and {v.answers[-1]}.")
  (q,) = make_samples("niah_multiquery", tok, 2048, 1, seed=0)
  assert q.prompt.count(", and ") >= 2 and len(q.depths) == 4
  (vt,) = make_samples("vt", tok, 4096, 1, seed=0)
  assert vt.prompt.count("Memorize and track the chain(s)") == 2  # the in-context example
  assert all(f"VAR {a} = " in vt.prompt for a in vt.answers)
  assert vt.prompt.endswith("they are: ") and vt.gold == [" " + " ".join(vt.answers)]


# --- scorers -----------------------------------------------------------------------------------


def test_scorers_equal_ruler_on_hand_made_cases():
  preds = ["The numbers are 123 and 456.", "abc", "nothing here", "UUID-X and uuid-y"]
  refs = [["123", "456", "789"], ["ABC"], ["q"], ["uuid-x", "UUID-Y"]]
  # string_match_all: mean over samples of the fraction of references found (case-insensitive)
  assert string_match_all(preds, refs) == round((2 / 3 + 1 + 0 + 1) / 4 * 100, 2) == 66.67
  # string_match_part: mean over samples of "any reference found"
  assert string_match_part(preds, refs) == 75.0
  assert string_match_part(["Denver Broncos won"], [["denver broncos", "Carolina"]]) == 100.0
  # RULER's postprocess_pred: stripped, control characters become newlines
  assert score_generations("string_match_all", ["\x00 12\x0134 "], [["12\n34"]]) == 100.0
  assert score_generations("string_match_all", [" 1234 "], [["12\n34"]]) == 0.0


# --- models: oracle, uniform, tiny llama -------------------------------------------------------


def _oracle_forward(tokens_BT, where_BA, vocab=384):
  """Logits that put all mass on the true next token (the gold, when teacher forcing)."""
  next_BA = np.take_along_axis(np.asarray(tokens_BT), np.asarray(where_BA) + 1, axis=1)
  return 30.0 * np.eye(vocab, dtype=np.float32)[next_BA]


def test_oracle_scores_100_and_uniform_model_scores_chance(tmp_path, qa_file):
  tok = ByteTokenizer()
  common = dict(tasks=("ruler",), lengths=(1024, 2048), samples=2, seed=1, qa_path=qa_file)
  common.update(scoring=("teacher_forced",), batch_size=4, log=lambda _: None)
  oracle = ruler.evaluate_ruler(None, tok, forward=_oracle_forward, **common)
  uniform = ruler.evaluate_ruler(
    None, tok, forward=lambda t, w: np.zeros((*np.shape(w), 384), np.float32), **common
  )
  for task in oracle["tasks"]:
    for n in ("1024", "2048"):
      cell, flat = oracle["results"][task][n], uniform["results"][task][n]
      if "skipped" in cell:
        continue
      assert cell["tf_score"] == 100.0 and abs(cell["tf_logprob_per_token"]) < 1e-6
      # uniform over V=384: log p = -ln 384 for every gold token; exact match has chance
      # 384^-n (n gold tokens), i.e. 0 here (argmax ties go to id 0, never a gold token)
      assert flat["tf_score"] == 0.0
      assert flat["tf_logprob_per_token"] == pytest.approx(-math.log(384), abs=1e-5)
  assert oracle["average_tf_score"]["2048"] == 100.0
  # Generation: a model that emits the gold continuation scores 100 with RULER's scorers.
  for task in TASKS:
    try:
      samples = make_samples(task, tok, 4096, 2, seed=2, qa_path=qa_file)
    except TaskTooShort:
      samples = make_samples(task, tok, 16384, 2, seed=2, qa_path=qa_file)
    scorer = "string_match_part" if task == "qa" else "string_match_all"
    assert (
      score_generations(scorer, [s.gold[0] for s in samples], [s.answers for s in samples]) == 100
    )  # noqa: E501
    assert score_generations(scorer, ["" for s in samples], [s.answers for s in samples]) == 0


@pytest.fixture(scope="module")
def hf_run(hf_tokenizer_folder, tmp_path_factory):
  """A tiny Llama saved as a Hugging Face folder with the BPE tokenizer, the smoke config of
  `scripts/eval.py --hf` pointing at it, and the model that config builds."""
  from flax import nnx

  from lcjax.config import load_config
  from lcjax.interop.hf import save_pretrained
  from lcjax.models import build_model
  from lcjax.models.config import llama_config
  from lcjax.train.run_model import build_run_model

  cfg = llama_config(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  cfg.vocab_size = 640  # the tokenizer's 600 ids padded to 128
  hf = tmp_path_factory.mktemp("hf_model")
  save_pretrained(build_model(cfg, rngs=nnx.Rngs(1)), cfg, str(hf))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (hf / name).write_bytes((hf_tokenizer_folder / name).read_bytes())
  config = load_config("configs/ruler_eval.py:smoke", lock=False)
  config.init_from = str(hf)
  config.data.tokenizer.kind = "hf"
  config.data.tokenizer.path = str(hf)
  config.eval.tasks = ("niah_single_1", "niah_multikey_2", "fwe", "cwe")
  config.eval.lengths = (320,)  # one length and one answer budget: two compiles in all
  config.eval.ruler.update(samples=3, batch_size=3, depths=(10.0, 90.0), tokens_to_generate=16)
  return config, build_run_model(config)[0]


def test_greedy_em_from_one_forward_equals_ragged_greedy_decoding(hf_run):
  """On 51 prompts of unequal lengths: every greedily decoded token is the teacher-forced
  argmax (greedy-equivalent EM = generate EM), and a gold that departs at token j has exactly
  j leading matches in both. Shapes are the next test's (its compiles are reused)."""
  _, model = hf_run
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 600, size=int(n)).astype(np.int32) for n in rng.integers(8, 305, 51)]
  new = greedy_generate(model, prompts, max_new_tokens=16, batch_size=3, bucket=320 - 16)
  flips = rng.integers(0, 16, size=len(prompts))
  golds = []
  for i, g in enumerate(new):
    if i % 2:  # half the golds depart from the greedy output at token flips[i]
      g = g.copy()
      g[flips[i]] = (g[flips[i]] + 1) % 600
    golds.append(g)
  rows = list(zip(prompts, golds, strict=True))
  got = teacher_forced(model_forward(model), rows, batch_size=3, length=320)
  for i, ((_, hit), g, out) in enumerate(zip(got, golds, new, strict=True)):
    gen_em = bool(np.array_equal(out[: g.size], g))
    assert bool(hit.all()) == gen_em == (i % 2 == 0)
    assert leading_matches(hit) == leading_matches(out == g) == (16 if i % 2 == 0 else flips[i])


def test_hf_folder_through_evaluate_run_writes_json_table_and_heatmaps(hf_run, tmp_path):
  config, _ = hf_run
  lines = []
  result = evaluate_run(config, str(tmp_path / "out"), log=lines.append)
  out = tmp_path / "out"
  data = json.loads((out / "eval" / "ruler.json").read_text())
  assert data["results"]["niah_single_1"]["320"]["scorer"] == "string_match_all"
  assert data["results"]["niah_single_1"]["320"]["n"] == 3
  assert "skipped" in data["results"]["cwe"]["320"]  # its few-shot example alone overflows
  md = (out / "eval" / "ruler.md").read_text()
  assert "| niah_multikey_2 |" in md and "Effective length" in md and "**average**" in md
  assert (out / "plots" / "niah_single_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (out / "plots" / "niah_fwe.png").exists()  # no needle, no heatmap
  assert any(line.startswith("task 1/4: niah_single_1 @ 320") for line in lines)
  assert any("samples, " in line and "/s)" in line for line in lines)
  for rec in result["records"]:
    assert rec["tf_em"] == rec["gen_em"]
    assert rec["tf_leading_matches"] == rec["gen_leading_matches"]
    if rec["task"].startswith("niah"):
      # the first answer's needle at the grid depth, up to one haystack unit
      grid = min(abs(rec["depth"] - 10.0), abs(rec["depth"] - 90.0))
      assert grid <= 100.0 / rec["haystack_units"], rec
  metrics = (out / "metrics.jsonl").read_text()
  assert "eval/ruler_effective_length" in metrics


def test_effective_length_and_heatmap_grid():
  assert ruler.effective_length([4096, 8192, 16384], [90.0, 86.0, 70.0]) == 8192
  assert ruler.effective_length([4096, 8192, 16384], [80.0, 90.0, 90.0]) == 0
  assert ruler.effective_length([4096, 8192], [85.6, math.nan]) == 4096
  from lcjax.eval.niah_plots import depth_length_grid

  recs = [
    dict(length=1024, depth=12.0, score=100.0),
    dict(length=1024, depth=8.0, score=0.0),
    dict(length=2048, depth=95.0, score=50.0),
    dict(length=2048, depth=None, score=10.0),
  ]
  mean_DL, count_DL = depth_length_grid(recs, [1024, 2048], [10.0, 50.0, 90.0])
  assert mean_DL[0, 0] == 50.0 and count_DL[0, 0] == 2 and mean_DL[2, 1] == 50.0
  assert np.isnan(mean_DL[1, 0]) and count_DL.sum() == 3


def test_gold_tokens_split_at_the_prompt_and_mark_items(hf_tokenizer_folder):
  tok = HFTokenizer(str(hf_tokenizer_folder))
  (s,) = make_samples("niah_multivalue", tok, 2048, 1, seed=5)
  ((g, masks),) = gold_tokens(tok, s)
  joint = tok.encode(s.prompt + s.gold[0])
  assert list(joint) == list(s.prompt_ids[1:]) + list(g)  # BOS, then the joint tokens
  assert len(masks) == 4 and all(m.any() for m in masks)
  for answer, m in zip(s.answers, masks, strict=True):
    assert answer in tok.decode(g[m])


# --- errors ------------------------------------------------------------------------------------


def test_bad_input_gets_one_line_errors(tmp_path, qa_file):
  tok = ByteTokenizer()
  with pytest.raises(RulerError, match="unknown RULER task 'niah_single_9'"):
    make_samples("niah_single_9", tok, 4096, 1)
  with pytest.raises(RulerError, match="unknown eval task 'bogus'"):
    ruler.resolve_tasks(["niah", "bogus"], qa_path=None)
  with pytest.raises(TaskTooShort, match=r"niah_multiquery does not fit length=300") as e:
    make_samples("niah_multiquery", tok, 300, 1)
  assert "\n" not in str(e.value)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n\n{"context": 3}\n')
  with pytest.raises(RulerError, match=f"^{bad}:3: a qa row needs 'context'"):
    load_qa_jsonl(str(bad))
  bad.write_text('{"context": "c", "question": "q", "answers": ["a"]}\nnot json\n')
  load_qa_jsonl.cache_clear()
  with pytest.raises(RulerError, match=f"^{bad}:2: not a JSON object"):
    load_qa_jsonl(str(bad))
  notices = []
  assert "qa" not in ruler.resolve_tasks(["ruler"], qa_path=None, log=notices.append)
  assert notices and "eval.ruler.qa_path" in notices[0]
  assert ruler.resolve_tasks(["qa", "niah_single_1"], qa_path=qa_file) == ["niah_single_1", "qa"]
  from lcjax.train.config import base_config, validate_config

  c = base_config()
  c.eval.tasks, c.eval.lengths = ("niah", "nope"), (4096,)
  with pytest.raises(ConfigError, match="^eval.tasks: unknown eval task 'nope'"):
    validate_config(c)
  c.eval.tasks, c.eval.ruler.chat_template = ("niah",), "llama9"
  with pytest.raises(ConfigError, match="eval.ruler.chat_template='llama9' is unknown"):
    validate_config(c)


# --- a trained quickstart checkpoint and the script (slow) -------------------------------------


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  """configs/quickstart.py:tiny trained for 30 steps (~20 s on 2 cores)."""
  from lcjax.config import load_config
  from lcjax.train import train

  workdir = tmp_path_factory.mktemp("qs")
  config = load_config("configs/quickstart.py:tiny", {"eval.ppl_lengths": ()})
  train(config, str(workdir))
  return config, str(workdir)


@pytest.mark.slow
def test_trained_quickstart_greedy_em_equals_generate_em(quickstart_run):
  from lcjax.models.generate import generate
  from lcjax.train.run_model import load_run_params, model_from_params

  config, workdir = quickstart_run
  params, cfg, _ = load_run_params(workdir)
  model = model_from_params(params, cfg)
  result = ruler.evaluate_ruler(
    model,
    ByteTokenizer(),
    tasks=("niah_single_1", "niah_multikey_2", "niah_multikey_3", "fwe"),
    lengths=(1024,),
    samples=16,
    tokens_to_generate=24,
    batch_size=8,
    log=lambda _: None,
  )
  recs = result["records"]
  assert len(recs) >= 50
  for rec in recs:
    assert rec["tf_em"] == rec["gen_em"]
    assert rec["tf_leading_matches"] == rec["gen_leading_matches"]
  assert any(r["tf_leading_matches"] > 0 for r in recs)  # the trained model gets some right
  # The ragged decoder equals lcjax.models.generate on one prompt.
  (s,) = make_samples("niah_single_1", ByteTokenizer(), 1024, 1, tokens_to_generate=24)
  want = np.asarray(generate(model, s.prompt_ids[None], max_new_tokens=8))[0, s.prompt_ids.size :]
  (got,) = greedy_generate(model, [s.prompt_ids], max_new_tokens=8, batch_size=1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_eval_script_on_a_quickstart_run(quickstart_run):
  config, workdir = quickstart_run
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
    sys.executable,
    os.path.join(ROOT, "scripts", "eval.py"),
    "--config",
    os.path.join(ROOT, "configs", "quickstart.py:tiny"),
    "--workdir",
    workdir,
    "--config.eval.tasks=('niah_single_1','niah_multikey_2','fwe')",
    "--config.eval.lengths=(256,512,1024)",
    "--config.eval.ruler.samples=4",
  ]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "task 9/9: fwe @ 1024" in proc.stdout
  for name in ("eval/ruler.json", "eval/ruler.md", "plots/niah_single_1.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  bad = subprocess.run(
    [*cmd[:-3], "--config.eval.tasks=('nope',)", "--config.eval.lengths=(512,)"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
    "error: eval.tasks: unknown eval task 'nope'"
  )


@pytest.mark.slow
def test_eval_script_hf_flag(hf_run, tmp_path):
  config, _ = hf_run
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  script = os.path.join(ROOT, "scripts", "eval.py")
  out = str(tmp_path / "out")
  cmd = [sys.executable, script, "--hf", config.init_from, "--workdir", out]
  proc = subprocess.run(
    [
      *cmd,
      "--config",
      os.path.join(ROOT, "configs", "ruler_eval.py:smoke"),
      "--config.eval.lengths=(320,)",
      "--config.eval.ruler.tokens_to_generate=16",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(open(os.path.join(out, "eval", "ruler.json")).read())
  assert result["checkpoint"] == config.init_from and result["tasks"] == [
    "niah_single_1",
    "niah_multikey_2",
    "fwe",
  ]
  missing = subprocess.run(
    [sys.executable, script, "--hf", str(tmp_path / "nope"), "--workdir", out],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
    f"error: --hf {tmp_path / 'nope'}: not a folder; point it at a Hugging Face checkpoint"
  )
  neither = subprocess.run(
    [sys.executable, script, "--workdir", out], env=env, capture_output=True, text=True
  )
  assert neither.returncode == 2 and "pass --config" in neither.stderr
