"""LongBench on local files: metrics against LongBench's, prompts, truncation, the harness.

Reference values marked "reference" were computed with LongBench `metrics.py`
(THUDM/LongBench@2e00731) and its packages rouge 1.0.1, fuzzywuzzy 0.18.0 (pure-Python
path) and jieba 0.42.1; the others are worked out by hand in the comments.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lcjax.data.tokenizers import ByteTokenizer
from lcjax.eval import longbench as lb
from lcjax.eval import text_metrics as tm

# --- metrics -------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_whitespace():
  # "theater" keeps its "the": articles are whole words.
  assert tm.normalize_answer("An apple, the pie.  Theater!") == "apple pie theater"
  assert tm.normalize_zh_answer("Ａ北京，　大学. X") == "ａ北京大学x"  # reference


def test_qa_f1_partial_match():
  # "cat sat on mat" vs "cat on mat": 3 shared, P = 3/4, R = 1, F1 = 6/7.
  assert tm.qa_f1_score("The Cat sat on the mat!", "a cat on a mat") == pytest.approx(6 / 7)
  assert tm.qa_f1_score("The Cat sat on the mat!", "a cat on a mat") == 0.8571428571428571
  assert tm.qa_f1_score("Paris", "London") == 0
  assert tm.qa_f1_score("", "London") == 0


def test_rouge_l_matches_pltrdy_rouge():
  # One sentence each: 5 distinct words each side, LCS {the, cat, on, mat}: R = P = 4/5.
  assert tm.rouge_score("the cat sat on the mat", "the cat is on the mat") == 0.7999999950000002
  # Summary level: the union of the LCS word sets over sentence pairs covers everything.
  assert tm.rouge_score("a b c. d e", "a c d. e b") == 0.999999995
  # Distinct words (exclusive=True): repeating the reference still scores 1.
  assert tm.rouge_score("the cat the cat", "the cat") == 0.999999995
  # The backtrack's tie rule picks LCS("a b", "b a") = {b}, which "b" repeats: |U| = 1.
  assert tm.rouge_score("b a", "a b. b") == 0.4999999950000001
  # "." splits sentences, even inside 3.14 (reference).
  assert tm.rouge_score("pi is 3.14 ok", "pi is 3") == 0.7499999953125
  for pred, gold in (("", "x"), ("...", "x"), ("x", "")):
    assert tm.rouge_score(pred, gold) == 0.0
  scores = tm.rouge_l("the cat sat on the mat", "the cat is on the mat")
  assert scores["p"] == scores["r"] == 0.8


def test_rouge_l_long_sentence_has_no_recursion_limit():
  # pltrdy's recursive backtrack fails past ~1000 steps; ours gives the exact value:
  # the reference keeps every other candidate word: R = 1, P = 1/2, F = 2/3.
  hyp = " ".join(f"w{i}" for i in range(1200))
  ref = " ".join(f"w{i}" for i in range(0, 1200, 2))
  assert tm.rouge_score(hyp, ref) == pytest.approx(2 / 3, abs=1e-7)


def test_code_sim_is_fuzz_ratio_of_first_code_line():
  # Lines with ` or # are skipped; "x = foo(1)" vs "x = foo(2)": 2*9/20 = 0.9.
  assert tm.code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == 0.9
  # One matching char in 16: 100 * 2/16 = 12.5 rounds half to even -> 12.
  assert tm.fuzz_ratio("abcdefgh", "hijklmno") == 12
  assert tm.code_sim_score("abcdefgh", "hijklmno") == 0.12
  assert tm.code_sim_score("", "x") == 0.0
  assert tm.code_sim_score("\n\n", "") == 1.0  # equal empty strings: 100 (reference)
  assert tm.code_sim_score("// c\nreturn x;", "return x;") == 1.0


def test_classification_keeps_longbench_list_quirk():
  # "a" (a substring of the answer) is removed while iterating, which skips "ab": 1/2.
  assert tm.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
  assert tm.classification_score("cat dog", "cat dog", all_classes=["cat", "cat dog", "dog"]) == 1
  classes = ["location", "number", "person"]
  assert tm.classification_score("location or number", "number", all_classes=classes) == 0.5
  assert tm.classification_score("person", "number", all_classes=["number", "person"]) == 0.0


def test_retrieval_and_count_share_of_numbers():
  assert tm.retrieval_score("Paragraph 3, not Paragraph 12", "Paragraph 3") == 0.5
  assert tm.retrieval_zh_score("答案是段落7", "段落7") == 1.0
  assert tm.count_score("There are 5 or 6", "5") == 0.5
  assert tm.count_score("none", "5") == 0.0
  with pytest.raises(ValueError, match="Paragraph"):
    tm.retrieval_score("3", "third")


def test_chinese_metrics_char_and_injected_segmenter():
  seg, label = tm.zh_segmenter("char")
  assert label == "char"
  # Characters: 北 京 大 学 (。 dropped) vs 北 京: P = 1/2, R = 1, F1 = 2/3.
  assert tm.qa_f1_zh_score("北京大学。", "北京", segment=seg) == pytest.approx(2 / 3)
  # Words (jieba gives ["北京大学", "。"], reference 0): no shared word.
  words = lambda text: text.split("|")
  assert tm.qa_f1_zh_score("北京大学|。", "北京", segment=words) == 0
  assert tm.qa_f1_zh_score("北京|大学|。", "北京", segment=words) == pytest.approx(2 / 3)
  # ROUGE-L on characters joined by spaces: LCS 我 爱 of 4 each: F = 1/2.
  assert tm.rouge_zh_score("我爱北京", "我爱上海", segment=seg) == 0.4999999950000001
  with pytest.raises(ValueError, match="zh_segmenter"):
    tm.zh_segmenter("spacy")


# --- configuration, prompts, truncation -------------------------------------------------


def test_configs_are_longbench_verbatim():
  # sha256 of LongBench/config/dataset2prompt.json and dataset2maxlen.json (THUDM/LongBench
  # @2e00731) parsed and dumped with sort_keys=True, ensure_ascii=False.
  dump = lambda d: json.dumps(d, sort_keys=True, ensure_ascii=False).encode()
  assert hashlib.sha256(dump(lb.DATASET2PROMPT)).hexdigest() == (
    "e7d865d712fe45e2455f5e864ac474001d7758d68d349e76ffbcdd382483358f"
  )
  assert hashlib.sha256(dump(lb.DATASET2MAXLEN)).hexdigest() == (
    "39a79d9491ead3dc8bcea6dbd8b963b29248eb4c344dde1e176b0a58b4e758a9"
  )
  assert set(lb.DATASET2METRIC) == set(lb.DATASET2PROMPT) == set(lb.DATASET2MAXLEN)
  assert set(lb.LONGBENCH_E_DATASETS) <= set(lb.DATASETS)
  assert lb.DATASET2METRIC["dureader"][0] == "rouge_l_zh"
  assert lb.DATASET2METRIC["repobench-p"][0] == "code_sim"


def test_prompts_are_formatted_exactly():
  row = dict(context="P1 {x} text", input="Who?", answers=["a"], all_classes=None, length=3)
  assert lb.format_prompt("hotpotqa", row) == (
    "Answer the question based on the given passages. Only give me the answer and do not "
    "output any other words.\n\nThe following are given passages.\nP1 {x} text\n\nAnswer the "
    "question based on the given passages. Only give me the answer and do not output any "
    "other words.\n\nQuestion: Who?\nAnswer:"
  )
  assert lb.format_prompt("lcc_e", row) == (
    "Please complete the code given below. \nP1 {x} textNext line of code:\n"
  )
  lsht = "请判断给定新闻的类别，下面是一些例子。\n\nP1 {x} text\nWho?"
  assert lb.format_prompt("lsht", row) == lsht


def test_truncate_middle_keeps_first_and_last_halves():
  assert lb.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
  assert lb.truncate_middle(list(range(10)), 5) == [0, 1, 8, 9]  # int(5 / 2) each side
  assert lb.truncate_middle(list(range(10)), 10) == list(range(10))
  with pytest.raises(ValueError, match="max_len"):
    lb.truncate_middle([1, 2, 3], 1)


def test_encoded_prompt_counts_bos_and_truncates_in_the_middle():
  tok = ByteTokenizer()
  row = dict(context="x" * 500, input="Q?", answers=["a"], all_classes=None, length=1)
  text = lb.format_prompt("multifieldqa_en", row)
  full = [tok.bos_id, *text.encode()]
  ids, truncated = lb.encode_longbench_prompt(tok, "multifieldqa_en", row, 100)
  assert truncated and ids == full[:50] + full[-50:] and ids[0] == tok.bos_id
  ids, truncated = lb.encode_longbench_prompt(tok, "multifieldqa_en", row, len(full))
  assert not truncated and ids == full
  # build_chat follows pred.py: decode the halves, wrap, re-encode (not for lcc).
  chat = lambda t: f"[INST]{t}[/INST]"
  ids, _ = lb.encode_longbench_prompt(tok, "multifieldqa_en", row, 100, build_chat=chat)
  halves = bytes(full[1:50]).decode() + bytes(full[-50:]).decode()
  assert ids == [tok.bos_id, *chat(halves).encode()]
  ids, _ = lb.encode_longbench_prompt(tok, "lcc", row, 10_000, build_chat=chat)
  assert bytes(ids[1:]).decode() == lb.format_prompt("lcc", row)


# --- reading files -----------------------------------------------------------------------


def _row(context="ctx", question="q?", answers=("a",), classes=None, length=10):
  return dict(
    context=context, input=question, answers=list(answers), all_classes=classes, length=length
  )


def _write(path, rows):
  path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
  return path


@pytest.mark.parametrize(
  "bad, line, match",
  [
    ("{not json\n", 3, "not valid JSON"),
    ('["a list"]\n', 3, "JSON object"),
    (
      json.dumps({"context": "c", "input": "q", "all_classes": None, "length": 1}) + "\n",
      3,
      "answers",
    ),
    (json.dumps(_row(answers=[])) + "\n", 3, "answers"),
    (json.dumps(_row(length="long")) + "\n", 3, "length"),
    (json.dumps(_row(context=7)) + "\n", 3, "context"),
  ],
  ids=["not_json", "not_object", "no_answers", "empty_answers", "bad_length", "bad_context"],
)
def test_malformed_row_names_file_and_line(tmp_path, bad, line, match):
  path = _write(tmp_path / "hotpotqa.jsonl", [_row(), "\n", bad])
  with pytest.raises(ValueError, match=match) as err:
    lb.read_longbench_jsonl(path, "hotpotqa")
  assert f"{path}:{line}:" in str(err.value) and "\n" not in str(err.value)


def test_classification_rows_need_classes_and_unknown_names_list_known(tmp_path):
  path = _write(tmp_path / "trec.jsonl", [_row()])
  with pytest.raises(ValueError, match=f"{path}:1: trec is scored by classification"):
    lb.read_longbench_jsonl(path, "trec")
  with pytest.raises(ValueError, match="unknown LongBench dataset 'hotpot'") as err:
    lb.resolve_dataset("hotpot")
  assert "hotpotqa" in str(err.value) and "qasper_e" in str(err.value)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="unknown LongBench dataset 'musique_e'"):
    lb.resolve_dataset("musique_e")  # not in LongBench-E
  assert lb.resolve_dataset("gov_report_e") == ("gov_report", True)


# --- scoring and the harness ----------------------------------------------------------


def test_score_predictions_max_over_answers_first_line_and_buckets():
  out = lb.score_predictions(
    "hotpotqa", ["Paris", "London city"], [["paris", "Paris France"], ["Berlin"]], [None] * 2
  )
  assert out["samples"] == [1.0, 0.0] and out["score"] == 50.0 and out["metric"] == "qa_f1"
  # triviaqa scores only the first line after leading newlines (else F1 would be 2/3).
  out = lb.score_predictions("triviaqa", ["\n\nParis\nBerlin"], [["Paris"]], [None])
  assert out["score"] == 100.0
  out = lb.score_predictions(
    "passage_count_e",
    ["3", "4", "3", "3 or 4"],
    [["3"]] * 4,
    [None] * 4,
    [100, 3999, 5000, 9000],
  )
  assert out["buckets"] == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 50.0}
  assert out["score"] == 62.5
  out = lb.score_predictions("passage_count_e", ["3"], [["3"]], [None], [10])
  assert out["buckets"] == {"0-4k": 100.0, "4-8k": None, "8k+": None}


def _dataset_folder(tmp_path):
  classes = ["Number", "Location", "Person"]
  files = {
    "hotpotqa": [
      _row("Paris is in France. " * 30, "Capital of France?", ["Paris"]),
      _row("short", "Which city?", ["Berlin", "the city of Berlin"]),
    ],
    "trec_e": [
      _row("How far is it?\nType: Number", "Who is he?\nType:", ["Person"], classes, 50),
      _row("x", "Where?\nType:", ["Location"], classes, 5000),
    ],
    "lcc": [_row("def f(x):\n  return x\n", "", ["print(f(1))"])],
  }
  for name, rows in files.items():
    _write(tmp_path / f"{name}.jsonl", rows)
  return tmp_path, files


def test_evaluate_longbench_oracle_scores_100_and_reports_progress(tmp_path):
  folder, files = _dataset_folder(tmp_path)
  tok = ByteTokenizer()
  max_len = 400  # the short hotpotqa prompt (289 tokens) fits, the long one (891) not
  answer_of, calls = {}, []
  for name, rows in files.items():
    for row in rows:
      ids, _ = lb.encode_longbench_prompt(tok, name, row, max_len)
      answer_of[tuple(ids)] = row["answers"][-1]

  def oracle(prompts, max_new_tokens):
    calls.append((len(prompts), max_new_tokens))
    assert all(len(p) <= max_len for p in prompts)
    # The answer, then EOS and tokens that must be dropped.
    return [list(answer_of[tuple(p)].encode()) + [tok.eos_id, 65, 66] for p in prompts]

  lines = []
  result = lb.evaluate_longbench(
    oracle, tok, folder, None, max_len, batch_size=2, log=lines.append, progress_every_s=0
  )
  assert list(result["datasets"]) == ["hotpotqa", "lcc", "trec_e"]
  for name, entry in result["datasets"].items():
    assert entry["score"] == 100.0 and entry["n"] == len(files[name]), name
  assert result["average"] == 100.0
  assert result["datasets"]["trec_e"]["buckets"] == {"0-4k": 100.0, "4-8k": 100.0, "8k+": None}
  assert result["datasets"]["hotpotqa"]["truncated"] == 1
  assert result["datasets"]["hotpotqa"]["records"][1]["pred"] == "the city of Berlin"
  assert result["categories"]["Multi-Doc QA"] == 100.0
  assert sorted(calls) == [(1, 64), (2, 32), (2, 64)]  # max_new_tokens from dataset2maxlen
  assert any("[1/3] hotpotqa: 2/2 samples" in s and "samples/s" in s for s in lines)
  assert any("[3/3] trec_e: classification 100.00" in s for s in lines)
  table = lb.longbench_markdown(result)
  assert "| trec_e | classification | 2 | 0 | 100.00 | 100.00 | 100.00 |  |" in table


def test_evaluate_longbench_wrong_answers_and_bad_generate_fn(tmp_path):
  folder, _ = _dataset_folder(tmp_path)
  tok = ByteTokenizer()
  wrong = lambda prompts, n: [list(b"zzz") for _ in prompts]
  result = lb.evaluate_longbench(wrong, tok, folder, ["hotpotqa", "lcc"], 200, log=None)
  assert result["datasets"]["hotpotqa"]["score"] == 0.0
  assert result["datasets"]["lcc"]["score"] == 0.0
  assert result["zh_segmenter"] is None
  with pytest.raises(ValueError, match="returned 0 continuations for 1 prompts"):
    lb.evaluate_longbench(lambda p, n: [], tok, folder, ["lcc"], 200, log=None)
  with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
    lb.evaluate_longbench(wrong, tok, folder, ["qasper"], 200, log=None)
  with pytest.raises(ValueError, match="unknown LongBench dataset"):
    lb.evaluate_longbench(wrong, tok, folder, ["nope"], 200, log=None)
  one = lb.evaluate_longbench(wrong, tok, folder / "lcc.jsonl", None, 200, limit=1, log=None)
  assert list(one["datasets"]) == ["lcc"]


# --- scripts/eval.py: eval.tasks=("longbench",) on a tiny untrained model --------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 200  # prompt tokens: lcc's short row fits, its long row and every hotpotqa row not


def _rows_for_model():
  """hotpotqa: two truncated prompts; lcc: a short prompt (not truncated) and a long one."""
  code = "".join(f"def f{i}(x):\n  return x + {i}\n" for i in range(12))
  return {
    "hotpotqa": [
      _row("Passage 1: Paris is the capital of France. " * 12, "Capital?", ["Paris"]),
      _row("Passage 2: Rome is in Italy. " * 12, "Where is Rome?", ["Italy"]),
    ],
    "lcc": [_row("x = 1\ny = 2\n", "", ["z = 3"]), _row(code, "", ["def f12(x):"])],
  }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 1-layer Llama with the byte vocabulary saved as a Hugging Face folder (`init_from`),
  the eval config scripts/eval.py builds for it, and that model."""
  from flax import nnx

  from lcjax.config import load_config
  from lcjax.interop.hf import save_pretrained
  from lcjax.models import build_model
  from lcjax.models.config import llama_config
  from lcjax.train.run_model import build_run_model

  cfg = llama_config(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  cfg.vocab_size = 384  # lcjax's byte tokenizer, padded
  hf = tmp_path_factory.mktemp("lb_model")
  save_pretrained(build_model(cfg, rngs=nnx.Rngs(3)), cfg, str(hf))
  config = load_config("configs/ruler_eval.py", lock=False)
  config.init_from = str(hf)
  return config, build_run_model(config)[0]


def _longbench_config(config, folder, **fields):
  config = config.copy_and_resolve_references()
  config.eval.tasks = ("longbench",)
  fields = {"path": str(folder), "max_len": MAX_LEN, "batch_size": 2, **fields}
  config.eval.longbench.update(**fields)
  return config


def test_eval_tasks_longbench_decodes_truncated_prompts_and_writes_outputs(tiny_run, tmp_path):
  """scripts/eval.py's function on a tiny model, one compiled decoder: every prediction is the
  greedy continuation of pred.py's prompt (BOS, middle truncation) cut at EOS, in file order;
  an oracle row scores 1; the json, the table and the metrics lines are written. (The ragged
  decoder equals `lcjax.models.generate` row by row: tests/test_ruler.py.)"""
  from lcjax.eval.ruler_run import evaluate_tasks
  from lcjax.eval.ruler_score import greedy_generate
  from lcjax.train.config import validate_config

  config, model = tiny_run
  tok = ByteTokenizer()
  rows = _rows_for_model()["lcc"]
  prompts = [lb.encode_longbench_prompt(tok, "lcc", row, MAX_LEN) for row in rows]
  assert [t for _, t in prompts] == [False, True] and len(prompts[1][0]) == MAX_LEN
  assert prompts[0][0][0] == tok.bos_id and len(prompts[0][0]) < MAX_LEN
  # The reference decodes the rows in the other order (the harness sorts them by length).
  new = greedy_generate(
    model,
    [np.asarray(p) for p, _ in prompts[::-1]],
    max_new_tokens=lb.DATASET2MAXLEN["lcc"],
    batch_size=2,
    bucket=MAX_LEN,
    pad_id=tok.pad_id,
  )[::-1]
  want = []
  for n in new:
    n = list(n)
    want.append(tok.decode(n[: n.index(tok.eos_id)] if tok.eos_id in n else n))
  # The first row's answer is the first code line of its own prediction: an oracle row.
  code = [s for s in want[0].lstrip("\n").split("\n") if not any(c in s for c in "`#")]
  code = [s for s in code if "//" not in s]
  rows[0]["answers"] = [code[0] if code else ""]
  _write(tmp_path / "lcc.jsonl", rows)
  _write(tmp_path / "hotpotqa.jsonl", [_row()])  # not named in datasets: not run
  config = _longbench_config(config, tmp_path, datasets=("lcc",))
  validate_config(config)
  lines = []
  out = tmp_path / "out"
  result = evaluate_tasks(config, str(out), log=lines.append)
  assert list(result) == ["longbench"]
  result = result["longbench"]
  assert list(result["datasets"]) == ["lcc"]
  lcc = result["datasets"]["lcc"]
  assert [r["pred"] for r in lcc["records"]] == want
  assert [r["prompt_tokens"] for r in lcc["records"]] == [len(p) for p, _ in prompts]
  expected = lb.score_predictions("lcc", want, [r["answers"] for r in rows], [None, None])
  assert lcc["records"][0]["score"] == 1.0 and lcc["score"] == expected["score"]
  assert lcc["truncated"] == 1 and lcc["n"] == 2 and lcc["max_new_tokens"] == 64
  saved = json.loads((out / "eval" / "longbench.json").read_text())
  assert saved["checkpoint"] == config.init_from and saved["max_len"] == MAX_LEN
  assert saved["datasets"]["lcc"]["records"][1]["pred"] == want[1]
  md = (out / "eval" / "longbench.md").read_text()
  assert md.startswith("# LongBench") and f"| lcc | code_sim | 2 | 1 | {lcc['score']:.2f} |" in md
  metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["eval/longbench_lcc"] == lcc["score"]
  assert metrics[-1]["eval/longbench_average"] == result["average"] == lcc["score"]
  assert any(s.startswith("LongBench on ") for s in lines)
  assert any("[1/1] lcc: 2/2 samples" in s for s in lines)


def test_prompt_bucket_and_config_errors_name_the_field(tiny_run, tmp_path):
  from lcjax.config import ConfigError
  from lcjax.eval.ruler_run import _prompt_bucket
  from lcjax.train.config import validate_config

  assert [_prompt_bucket(n, 3500) for n in (10, 256, 257, 3000, 3500)] == [
    256,
    256,
    512,
    3500,
    3500,
  ]
  assert _prompt_bucket(210, 200) == 210  # a chat-wrapped prompt may exceed max_len
  config, _ = tiny_run
  _write(tmp_path / "hotpotqa.jsonl", [_row()])
  cases = [
    (dict(path=None), "^eval.longbench.path is not set; point it at a folder"),
    (dict(path=str(tmp_path / "nope")), "^eval.longbench.path='.*nope' does not exist"),
    (dict(datasets=("qasper",)), r"^eval.longbench.datasets=\('qasper',\): dataset qasper: "),
    (dict(datasets=("hotpot",)), "^eval.longbench.datasets=.*unknown LongBench dataset"),
    (dict(max_len=1), "^eval.longbench.max_len=1 must be >= 2"),
    (dict(limit=0), "^eval.longbench.limit=0 must be >= 1"),
    (dict(zh_segmenter="spacy"), "^eval.longbench.zh_segmenter='spacy'"),
    (dict(chat_template="llama9"), "^eval.longbench.chat_template: chat template 'llama9'"),
  ]
  for fields, match in cases:
    bad = _longbench_config(config, tmp_path, **fields)
    with pytest.raises(ConfigError, match=match) as err:
      validate_config(bad)
    assert "\n" not in str(err.value)
  ok = _longbench_config(config, tmp_path, datasets=("hotpotqa",), chat_template="meta-chat")
  validate_config(ok)  # RULER's eval.lengths are not needed for LongBench alone
  ok.eval.tasks = ("longbench", "bogus")
  with pytest.raises(ConfigError, match="unknown eval task 'bogus'.*or 'longbench'"):
    validate_config(ok)
  assert lb.chat_builder("base") is None
  assert lb.chat_builder("meta-chat")("hi") == "[INST] hi [/INST]"


@pytest.mark.slow
def test_eval_script_longbench(tiny_run, tmp_path):
  """scripts/eval.py end to end (a subprocess: ~10 s of imports), and its missing-path error."""
  config, _ = tiny_run
  folder = tmp_path / "data"
  folder.mkdir()
  for name, rows in _rows_for_model().items():
    _write(folder / f"{name}.jsonl", rows)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "scripts", "eval.py"),
    "--config",
    os.path.join(ROOT, "configs", "ruler_eval.py"),
    f"--config.init_from={config.init_from}",
    "--workdir",
    str(out),
    "--config.eval.tasks=('longbench',)",
    f"--config.eval.longbench.max_len={MAX_LEN}",
  ]
  proc = subprocess.run(
    [*cmd, f"--config.eval.longbench.path={folder}", "--config.eval.longbench.limit=1"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "eval" / "longbench.json").read_text())
  assert sorted(result["datasets"]) == ["hotpotqa", "lcc"]
  assert all(r["n"] == 1 for r in result["datasets"].values())
  assert (out / "eval" / "longbench.md").exists() and "| **average** |" in proc.stdout
  missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2
  assert (
    missing.stderr.strip()
    .splitlines()[-1]
    .startswith("error: eval.longbench.path is not set; point it at a folder")
  )
