"""Synthetic task rows (`data.synthetic`, lcjax.data.synthetic): format, weights, resume, errors."""

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lcjax.config import ConfigError
from lcjax.data import ROW_KEYS, build_tokenizer, default_data_config, make_train_iterator
from lcjax.data import validate_data_config as validate
from lcjax.data.mqar import mqar_batch, mqar_example, mqar_vocabulary
from lcjax.data.synthetic import (
  SYNTHETIC_OPTIONS,
  SyntheticRows,
  mqar,
  mqar_row,
  passkey_row,
  token_passkey_length,
  token_passkey_row,
  token_passkey_vocabulary,
)
from lcjax.eval.passkey import NEEDLE, QUESTION, make_passkey_prompt

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

TOKENIZER = build_tokenizer({"kind": "byte"})


def passkey_config(seq_len=300, **options):
  cfg = default_data_config()
  cfg.synthetic.update(task="passkey", **options)
  cfg.seq_len = seq_len
  return cfg


def test_default_config_has_every_option_unset_and_off():
  cfg = default_data_config()
  assert list(cfg.synthetic) == sorted(SYNTHETIC_OPTIONS)
  assert all(cfg.synthetic[k] is None for k in SYNTHETIC_OPTIONS)
  assert validate(cfg)["synthetic"] is None
  assert validate(passkey_config())["synthetic"] == {
    "task": "passkey",
    "key_digits": 5,
    "lm_weight": 0.0,
  }


def test_passkey_rows_are_the_eval_prompt_then_the_key_weighted_on_its_digits():
  it = make_train_iterator(passkey_config(lm_weight=0.1), batch_size=4, seed=0)
  batch = next(it)
  assert sorted(batch) == sorted(ROW_KEYS)
  for key in ROW_KEYS:
    assert batch[key].shape == (4, 300)
  assert batch["loss_weights"].dtype == np.float32 and batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["segment_ids"], 1)  # byte tokens: exactly T + 1, no pad
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(300), (4, 300)))
  depths = []
  for b in range(4):
    weights = batch["loss_weights"][b]
    answer = TOKENIZER.decode(batch["targets"][b][weights == 1.0])
    assert len(answer) == 5 and answer.isdigit()
    assert weights[-5:].tolist() == [1.0] * 5  # the last five targets are the digits
    assert np.allclose(weights[:-5], 0.1)
    text = TOKENIZER.decode(batch["tokens"][b])
    assert batch["tokens"][b, 0] == TOKENIZER.bos_id
    assert NEEDLE.format(key=answer) in text
    assert text.endswith(f"{QUESTION} {answer[:-1]}")
    depths.append(text.index(NEEDLE.format(key=answer)))
  assert len(set(depths)) == 4  # the needle moves


def test_row_matches_make_passkey_prompt():
  rng = np.random.default_rng(7)
  row = passkey_row(TOKENIZER, rng, seq_len=260)
  rng = np.random.default_rng(7)
  key = int(rng.integers(10_000, 100_000))
  prompt, answer = make_passkey_prompt(
    TOKENIZER, length_tokens=260 + 1 - 6, depth=float(rng.uniform()), key=key
  )
  full = np.concatenate([row["tokens"], row["targets"][-1:]])
  np.testing.assert_array_equal(full, np.concatenate([prompt, TOKENIZER.encode(" " + answer)]))


def test_rows_are_deterministic_resumable_and_differ_by_split_seed_and_process():
  cfg = passkey_config(lm_weight=0.5)
  a = make_train_iterator(cfg, batch_size=2, seed=3)
  first = [next(a) for _ in range(2)]
  state = a.get_state()
  after = next(a)
  assert a.stats()["rows"] == 6 and a.stats()["tokens"] == 6 * 300
  b = make_train_iterator(cfg, batch_size=2, seed=3)
  for batch in first:
    again = next(b)
    assert all(np.array_equal(batch[k], again[k]) for k in ROW_KEYS)
  c = make_train_iterator(cfg, batch_size=2, seed=3)
  c.set_state(state)
  resumed = next(c)
  assert all(np.array_equal(after[k], resumed[k]) for k in ROW_KEYS)
  other_seed = next(make_train_iterator(cfg, batch_size=2, seed=4))
  other_process = next(
    make_train_iterator(cfg, batch_size=2, seed=3, process_index=1, process_count=2)
  )
  for other in (other_seed, other_process):
    assert not np.array_equal(other["tokens"], first[0]["tokens"])
  # The validation split: other rows, weighted on the answer alone (eval/loss = answer loss).
  val_cfg = passkey_config(lm_weight=0.5)
  val_cfg.split = "validation"
  val = next(make_train_iterator(val_cfg, batch_size=2, seed=3))
  assert not np.array_equal(val["tokens"], first[0]["tokens"])
  assert sorted(set(val["loss_weights"].ravel().tolist())) == [0.0, 1.0]
  assert (val["loss_weights"] == 1.0).sum() == 2 * 5


def test_a_state_from_another_task_or_layout_is_refused():
  it = make_train_iterator(passkey_config(), batch_size=2, seed=0)
  next(it)
  packed_cfg = default_data_config()
  packed_cfg.seq_len = 300
  packed = make_train_iterator(packed_cfg, batch_size=2, seed=0)
  with pytest.raises(ConfigError, match="synthetic"):
    packed.set_state(it.get_state())
  rows = SyntheticRows(validate(passkey_config())["synthetic"], TOKENIZER, seq_len=300, seed=0)
  with pytest.raises(ConfigError, match="'mqar' rows"):
    rows.set_state({"task": "mqar", "row": 1, "counters": {}})
  mqar_rows = SyntheticRows(validate(mqar_config())["synthetic"], TOKENIZER, seq_len=64, seed=0)
  with pytest.raises(ConfigError, match="'passkey' rows, not 'mqar'"):
    mqar_rows.set_state(rows.get_state())


@pytest.mark.parametrize(
  ("options", "data", "match"),
  [
    (
      {"task": "copying"},
      {},
      r"data.synthetic.task='copying' is unknown; choose one of passkey, mqar, token_passkey",
    ),
    ({"lm_weight": 0.1}, {}, r"data.synthetic.lm_weight is set but data.synthetic.task is not"),
    ({"task": "passkey", "key_digits": 0}, {}, r"key_digits must be an int in \[1, 18\]"),
    ({"task": "passkey", "lm_weight": -1.0}, {}, r"lm_weight must be a number >= 0"),
    ({"task": "passkey", "num_pairs": 4}, {}, r"num_pairs is not a synthetic task option"),
    ({"task": "passkey", "max_pairs": 4}, {}, r"max_pairs does not apply to kind 'passkey'"),
    ({"task": "mqar", "key_digits": 3}, {}, r"key_digits does not apply to kind 'mqar'"),
    ({"task": "mqar", "max_pairs": 0}, {}, r"data.synthetic.max_pairs must be an int >= 1"),
    ({"task": "mqar", "num_keys": 200}, {}, r"num_keys \+ num_values = 264 leaves no id for SEP"),
    ({"task": "mqar", "num_keys": 8}, {}, r"max_pairs=16 exceeds min\(num_keys, num_values\)=8"),
    (
      {"task": "token_passkey", "min_key_digits": 4},
      {},
      r"data.synthetic.min_key_digits must be an int in \[1, 3\]",
    ),
    ({"task": "token_passkey", "curriculum_rows": -1}, {}, r"curriculum_rows must be an int >= 0"),
    (
      {"task": "token_passkey", "min_length_fraction": 0.0},
      {},
      r"min_length_fraction must be a number in \(0, 1\]",
    ),
    (
      {"task": "token_passkey", "filler_vocab": 300},
      {},
      r"filler_vocab must be an int in \[1, 245\]",
    ),
    ({"task": "mqar"}, {"loss_weighting": "document"}, r"set data.loss_weighting='token'"),
    ({"task": "passkey"}, {"loss_weighting": "document"}, r"set data.loss_weighting='token'"),
    ({"task": "passkey"}, {"num_workers": 2}, r"set data.num_workers=0"),
    (
      {"task": "passkey"},
      {"mixture": [{"source": {"kind": "stdlib"}, "weight": 1.0}]},
      r"set data.mixture to None",
    ),
    ({"task": "passkey"}, {"decomposition": {}}, r"set data.decomposition to None"),
  ],
)
def test_bad_settings_are_one_sentence_errors(options, data, match):
  cfg = default_data_config().to_dict()
  cfg.update(seq_len=256, synthetic=options, **data)
  with pytest.raises(ConfigError, match=match) as e:
    validate(cfg)
  assert "\n" not in str(e.value)


def test_rows_too_short_for_the_prompt_fail_before_training():
  with pytest.raises(ConfigError, match=r"data.seq_len=200 is below the 253 tokens .*passkey"):
    make_train_iterator(passkey_config(seq_len=200), batch_size=1, seed=0)
  make_train_iterator(passkey_config(seq_len=253), batch_size=1, seed=0)  # the shortest fits
  # MQAR: the longest example, 16 pairs + SEP + 16 queries = 65 tokens, i.e. 64 inputs.
  with pytest.raises(ConfigError, match=r"data.seq_len=63 is below the 64 tokens of the longest"):
    make_train_iterator(mqar_config(seq_len=63), batch_size=1, seed=0)
  make_train_iterator(mqar_config(seq_len=64), batch_size=1, seed=0)


def mqar_config(seq_len=64, **options):
  cfg = default_data_config()
  cfg.synthetic.update(task="mqar", **options)
  cfg.seq_len = seq_len
  return cfg


def _pairs_of(tokens: np.ndarray, sep: int) -> dict[int, int]:
  """The key -> value pairs before SEP of one MQAR example."""
  context = tokens[: int(np.flatnonzero(tokens == sep)[0])]
  return dict(zip(context[0::2].tolist(), context[1::2].tolist(), strict=True))


def test_mqar_is_reexported_and_its_answers_are_recoverable_from_the_row():
  assert mqar.mqar_example is mqar_example
  vocab = mqar_vocabulary(64, 64)
  assert vocab == {"key_start": 0, "value_start": 64, "sep": 128, "size": 129}
  rng = np.random.default_rng(0)
  for num_pairs, num_queries in ((1, 4), (5, 5), (16, 16), (64, 16)):
    tokens, answer = mqar_example(
      rng, num_pairs=num_pairs, num_queries=num_queries, num_keys=64, num_values=64
    )
    assert tokens.size == 2 * num_pairs + 1 + 2 * num_queries
    assert tokens[2 * num_pairs] == vocab["sep"] and (tokens == vocab["sep"]).sum() == 1
    pairs = _pairs_of(tokens, vocab["sep"])
    assert len(pairs) == num_pairs  # distinct keys
    assert len(set(pairs.values())) == num_pairs  # distinct values
    assert all(0 <= k < 64 <= v < 128 for k, v in pairs.items())
    (where,) = np.nonzero(answer)
    assert where.size == num_queries
    for j in where:  # every scored value is the value of the key just before it
      assert tokens[j] == pairs[int(tokens[j - 1])]
    asked = tokens[where - 1].tolist()
    if num_queries <= num_pairs:
      assert len(set(asked)) == num_queries  # distinct queries
    else:
      assert set(asked) == set(pairs)  # every key is asked
  with pytest.raises(ValueError, match=r"num_pairs=65 must be in \[1, min"):
    mqar_example(rng, num_pairs=65, num_queries=1, num_keys=64, num_values=64)


def test_mqar_rows_weigh_the_queried_values_and_draw_k_uniformly():
  it = make_train_iterator(mqar_config(), batch_size=4, seed=0)
  batch = next(it)
  assert sorted(batch) == sorted(ROW_KEYS)
  for b in range(4):
    n = int(batch["segment_ids"][b].sum())  # the example's tokens (the rest is padding)
    tokens = np.concatenate([batch["tokens"][b, :n], batch["targets"][b, n - 1 : n]])
    pairs = _pairs_of(tokens, 128)
    assert n == 2 * len(pairs) + 1 + 2 * 16 or n == 64  # 2K + 1 + 2Q tokens, at most T
    weights = batch["loss_weights"][b]
    (scored,) = np.nonzero(weights)
    assert scored.size == 16 and np.all(weights[scored] == 1.0)
    for t in scored:  # target t is the value of the key at input t
      assert batch["targets"][b, t] == pairs[int(batch["tokens"][b, t])]
    assert np.all(batch["segment_ids"][b, n:] == 0) and np.all(batch["tokens"][b, n:] == 256)
  rng = np.random.default_rng(1)
  counts = np.zeros(17, int)
  for _ in range(3200):
    row = mqar_row(TOKENIZER, rng, seq_len=64)
    counts[int(np.flatnonzero(row["tokens"] == 128)[0]) // 2] += 1  # SEP follows 2K tokens
  assert counts[0] == 0 and counts[1:].sum() == 3200
  # K ~ U[1, 16]: 200 rows expected per K (binomial sd 14; 5 sd bounds).
  assert counts[1:].min() > 130 and counts[1:].max() < 270, counts
  batch = mqar_batch(
    np.random.default_rng(0), rows=3, num_pairs=32, num_queries=16, num_keys=64, num_values=64
  )
  assert batch["tokens"].shape == (3, 96) and batch["weights"].sum() == 3 * 16


def test_mqar_rows_resume_and_validation_rows_differ():
  cfg = mqar_config(max_pairs=8, num_queries=8, seq_len=40)
  a = make_train_iterator(cfg, batch_size=2, seed=3)
  next(a)
  state = a.get_state()
  after = next(a)
  b = make_train_iterator(cfg, batch_size=2, seed=3)
  b.set_state(state)
  resumed = next(b)
  assert all(np.array_equal(after[k], resumed[k]) for k in ROW_KEYS)
  cfg.split = "validation"
  val = next(make_train_iterator(cfg, batch_size=2, seed=3))
  assert not np.array_equal(val["tokens"], after["tokens"])


def test_token_passkey_rows_pack_curriculum_examples_with_recoverable_keys():
  vocab = token_passkey_vocabulary(64)
  options = {"curriculum_rows": 100, "min_length_fraction": 0.25, "key_digits": 3}
  lengths = [token_passkey_length(i, 64, options) for i in (0, 50, 99, 100, 10_000)]
  assert lengths == [17, 41, 64, 65, 65]  # T/4 of the T + 1 = 65 tokens, growing to T + 1
  assert token_passkey_length(0, 64, {**options, "curriculum_rows": 0}) == 65
  rng = np.random.default_rng(0)
  for index, examples in ((0, 4), (100, 1)):
    row = token_passkey_row(TOKENIZER, rng, seq_len=64, index=index, curriculum_rows=100)
    assert sorted(set(row["segment_ids"].tolist()) - {0}) == list(range(1, examples + 1))
    for seg in range(1, examples + 1):
      (at,) = np.nonzero(row["segment_ids"] == seg)
      tokens = np.concatenate([row["tokens"][at], row["targets"][at[-1:]]])
      key, query = np.flatnonzero(tokens == vocab["mark"]).tolist()  # needle, question
      digits = tokens[query + 1 :]
      assert 2 <= digits.size <= 3 and np.all(digits < 10)  # single-token digits
      np.testing.assert_array_equal(tokens[key + 1 : key + 1 + digits.size], digits)
      filler = np.delete(tokens, [key, *range(key + 1, key + 1 + digits.size), query])
      filler = filler[: filler.size - digits.size]
      assert np.all((filler >= vocab["filler_start"]) & (filler < vocab["size"]))
      weights = row["loss_weights"][at]
      assert weights.sum() == digits.size and np.all(weights[-digits.size :] == 1.0)
  cfg = default_data_config()
  cfg.synthetic.update(task="token_passkey", curriculum_rows=1000)
  cfg.seq_len = 64
  first = next(make_train_iterator(cfg, batch_size=2, seed=0))
  assert first["segment_ids"].max() == 4  # 64 // 16 examples of 17 tokens
  cfg.split = "validation"  # full length: no curriculum
  val = next(make_train_iterator(cfg, batch_size=2, seed=0))
  assert val["segment_ids"].max() == 1 and np.all(val["segment_ids"] == 1)


def test_command_line_selects_the_task(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(
    "from lcjax.data import default_data_config\n"
    "def get_config():\n"
    "  c = default_data_config()\n"
    "  c.seq_len = 300\n"
    "  return c\n"
  )
  argv = [
    "train.py",
    f"--config={path}",
    "--config.synthetic.task=passkey",
    "--config.synthetic.lm_weight=0.25",
    "--config.synthetic.key_digits=3",
  ]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  batch = next(make_train_iterator(values.config, batch_size=1, seed=0))
  assert (batch["loss_weights"] == 1.0).sum() == 3
  assert np.isclose(batch["loss_weights"][0, 0], 0.25)
