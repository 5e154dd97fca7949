"""Synthetic task rows (`data.synthetic`, lcjax.data.synthetic): format, weights, resume, errors."""

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lcjax.config import ConfigError
from lcjax.data import ROW_KEYS, build_tokenizer, default_data_config, make_train_iterator
from lcjax.data import validate_data_config as validate
from lcjax.data.synthetic import SYNTHETIC_OPTIONS, SyntheticRows, passkey_row
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


@pytest.mark.parametrize(
  ("options", "data", "match"),
  [
    ({"task": "mqar"}, {}, r"data.synthetic.task='mqar' is unknown; choose one of passkey"),
    ({"lm_weight": 0.1}, {}, r"data.synthetic.lm_weight is set but data.synthetic.task is not"),
    ({"task": "passkey", "key_digits": 0}, {}, r"key_digits must be an int in \[1, 18\]"),
    ({"task": "passkey", "lm_weight": -1.0}, {}, r"lm_weight must be a number >= 0"),
    ({"task": "passkey", "num_pairs": 4}, {}, r"num_pairs is not a synthetic task option"),
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
