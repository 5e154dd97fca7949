"""The data config: defaults, validation, and overrides from the command line as train.py parses
them (absl flags + ml_collections config_flags on a locked config), read through the pipeline.
"""

import ast
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lcjax.config import ConfigError
from lcjax.data import (
  SOURCE_OPTIONS,
  TOKENIZER_OPTIONS,
  build_source,
  build_tokenizer,
  default_data_config,
  make_eval_documents,
  make_train_iterator,
  validate_data_config,
)

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "lcjax" / "data"

CONFIG_FILE = """
import ml_collections

from lcjax.data import default_data_config


def get_config():
  c = ml_collections.ConfigDict()
  c.data = default_data_config()
  c.data.seq_len = 64
  return c
"""


def parse_config(tmp_path, *overrides):
  """The config scripts/train.py would get from `--config=FILE *overrides`."""
  path = tmp_path / "data_config.py"
  path.write_text(CONFIG_FILE)
  argv = ["train.py", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def write_jsonl(path, texts, field="text"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def row_text(batch):
  """The bytes of a byte-tokenizer batch, documents separated by newlines."""
  tokens = batch["tokens"][batch["segment_ids"] > 0]
  return bytes(np.where(tokens < 256, tokens, ord("\n")).astype(np.uint8)).decode()


def test_default_config_declares_every_option_unset():
  cfg = default_data_config()
  assert list(cfg.source) == sorted(SOURCE_OPTIONS) and cfg.source.kind == "stdlib"
  assert list(cfg.tokenizer) == sorted(TOKENIZER_OPTIONS) and cfg.tokenizer.kind == "byte"
  assert all(cfg.source[k] is None for k in SOURCE_OPTIONS if k != "kind")
  assert all(cfg.tokenizer[k] is None for k in TOKENIZER_OPTIONS if k != "kind")
  assert cfg.mixture is None and cfg.decomposition is None
  written = json.loads(cfg.to_json_best_effort())  # what train.py saves as config.json
  assert written["source"]["path"] is None and written["mixture"] is None
  valid = validate_data_config(cfg)
  assert valid["source"] == {"kind": "stdlib"} and valid["tokenizer"] == {"kind": "byte"}
  assert build_tokenizer(cfg.tokenizer).vocab_size == 384  # None options take the defaults


def test_readme_own_data_command(tmp_path):
  texts = [f"document {i} says hello" for i in range(12)]
  write_jsonl(tmp_path / "data" / "a.jsonl", texts[:6])
  write_jsonl(tmp_path / "data" / "b.jsonl", texts[6:])
  cfg = parse_config(
    tmp_path,
    "--config.data.source.kind=jsonl",
    f"--config.data.source.path={tmp_path}/data/*.jsonl",
    "--config.data.source.text_field=text",
    "--config.data.source.validation_fraction=0",
    "--config.data.tokenizer.pad_vocab_to=1",
  )
  valid = validate_data_config(cfg.data)
  assert valid["source"] == {
    "kind": "jsonl",
    "path": f"{tmp_path}/data/*.jsonl",
    "text_field": "text",
    "validation_fraction": 0.0,
  }
  assert valid["tokenizer"] == {"kind": "byte", "pad_vocab_to": 1}
  it = make_train_iterator(cfg.data, batch_size=2, seed=0)
  text = "".join(row_text(next(it)) for _ in range(4))
  assert "says hello" in text and '"text"' not in text  # the field, not the JSON line
  assert it.stats()["documents"] >= 4
  assert json.loads(cfg.to_json_best_effort())["data"]["source"]["text_field"] == "text"
  docs = make_eval_documents(cfg.data, split="all", add_special_tokens=False)
  assert sorted(bytes(d.astype(np.uint8)).decode() for d in docs) == sorted(texts)


def test_path_list_splits_and_bool_option_from_the_command_line(tmp_path):
  (tmp_path / "a.txt").write_text("alpha one\nalpha two\n")
  (tmp_path / "b.txt").write_text("beta one\n\nbeta two\n")
  (tmp_path / "c.txt").write_text("held out\n")
  cfg = parse_config(
    tmp_path,
    "--config.data.source.kind=text",
    f'--config.data.source.splits={{"train": ["{tmp_path}/a.txt", "{tmp_path}/b.txt"], '
    f'"validation": "{tmp_path}/c.txt"}}',
    "--config.data.source.one_document_per_line",
  )
  source = validate_data_config(cfg.data)["source"]
  assert source["splits"]["train"] == [f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"]
  assert source["one_document_per_line"] is True
  train = build_source(cfg.data.source, "train")
  assert [train[i] for i in range(len(train))] == [
    b"alpha one",
    b"alpha two",
    b"beta one",
    b"beta two",
  ]
  cfg = parse_config(
    tmp_path,
    "--config.data.source.kind=text",
    f'--config.data.source.path=["{tmp_path}/c.txt", "{tmp_path}/a.txt"]',
  )
  assert validate_data_config(cfg.data)["source"]["path"] == [
    f"{tmp_path}/c.txt",
    f"{tmp_path}/a.txt",
  ]
  assert len(build_source(cfg.data.source, "all")) == 2  # one document per file


def test_mixture_from_the_command_line(tmp_path):
  write_jsonl(tmp_path / "long.jsonl", [f"LONG-{i} " + "x" * 80 for i in range(8)], field="body")
  (tmp_path / "short.txt").write_text("".join(f"short-{i}\n" for i in range(8)))
  mixture = (
    f'[{{"source": {{"kind": "jsonl", "path": "{tmp_path}/long.jsonl", "text_field": "body"}}, '
    f'"weight": 0.6, "name": "long"}}, '
    f'{{"source": {{"kind": "text", "path": "{tmp_path}/short.txt", '
    f'"one_document_per_line": True, "text_field": None}}, "weight": 0.4}}]'
  )
  cfg = parse_config(tmp_path, f"--config.data.mixture={mixture}", "--config.data.split=all")
  valid = validate_data_config(cfg.data)
  assert valid["mixture"] == [
    {
      "source": {"kind": "jsonl", "path": f"{tmp_path}/long.jsonl", "text_field": "body"},
      "weight": 0.6,
      "name": "long",
    },
    {
      "source": {"kind": "text", "path": f"{tmp_path}/short.txt", "one_document_per_line": True},
      "weight": 0.4,
      "name": "1:text",
    },
  ]
  it = make_train_iterator(cfg.data, batch_size=4, seed=0)
  text = "".join(row_text(next(it)) for _ in range(5))
  assert "LONG-" in text and "short-" in text
  stats = it.stats()
  assert set(stats["sources"]) == {"long", "1:text"} and stats["rows"] == 20
  assert json.loads(cfg.to_json_best_effort())["data"]["mixture"][0]["weight"] == 0.6


def test_hf_tokenizer_and_decomposition_from_the_command_line(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  write_jsonl(tmp_path / "d.jsonl", ["hello world " * 5 * (i + 1) for i in range(10)])
  cfg = parse_config(
    tmp_path,
    "--config.data.source.kind=jsonl",
    f"--config.data.source.path={tmp_path}/d.jsonl",
    "--config.data.source.validation_fraction=0",
    "--config.data.tokenizer.kind=hf",
    f"--config.data.tokenizer.path={tmp_path}/tok",
    "--config.data.tokenizer.eos_token=</s>",
    "--config.data.tokenizer.vocab_size=16",
    '--config.data.decomposition={"min_log2": 3, "curriculum": [4, 3, 2, 1]}',
  )
  valid = validate_data_config(cfg.data)
  assert valid["tokenizer"] == {
    "kind": "hf",
    "path": f"{tmp_path}/tok",
    "eos_token": "</s>",
    "vocab_size": 16,
  }
  assert valid["decomposition"]["min_log2"] == 3 and valid["decomposition"]["max_log2"] == 6
  assert valid["decomposition"]["curriculum"] == [4.0, 3.0, 2.0, 1.0]
  assert valid["decomposition"]["cycles_per_pass"] == 1  # defaults: the reference's split
  assert valid["decomposition"]["long_split"] == "random"
  it = make_train_iterator(cfg.data, batch_size=2, seed=0)
  batch = next(it)
  assert batch["tokens"].size == 2 * 64 and batch["tokens"].shape[1] in (8, 16, 32, 64)
  real = batch["tokens"][batch["segment_ids"] > 0]
  assert set(np.unique(real).tolist()) <= {1, 2, 3}  # hello, world, eos (also bos) only


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    (
      ["--config.data.source.text_field=x"],
      r"data.source.text_field does not apply to kind 'stdlib'; options for 'stdlib': kind, "
      "validation_fraction",
    ),
    (
      ["--config.data.source.kind=jsonl", "--config.data.source.name=wiki"],
      "data.source.name does not apply to kind 'jsonl'; options for 'jsonl': kind, path",
    ),
    (
      ["--config.data.tokenizer.path=/models/x"],
      "data.tokenizer.path does not apply to kind 'byte'; options for 'byte': kind, pad_vocab_to",
    ),
    (
      ['--config.data.mixture=[{"source": {"kind": "stdlib", "path": "a"}, "weight": 1}]'],
      r"data.mixture\[0\].source.path does not apply to kind 'stdlib'",
    ),
    (
      ['--config.data.mixture=[{"source": {"kind": "tfds", "pathh": "a"}, "weight": 1}]'],
      r"data.mixture\[0\].source.pathh is not a source option; options for 'tfds'",
    ),
    (["--config.data.decomposition=[3]"], "data.decomposition must be None or a dict"),
  ],
)
def test_misplaced_options_from_the_command_line_raise(tmp_path, overrides, match):
  cfg = parse_config(tmp_path, *overrides)
  with pytest.raises(ConfigError, match=match):
    validate_data_config(cfg.data)


def test_command_line_cannot_add_unknown_options(tmp_path):
  with pytest.raises(AttributeError, match="text_feld"):  # locked: only declared options exist
    parse_config(tmp_path, "--config.data.source.text_feld=x")


def test_plain_dicts_with_only_some_options_still_work():
  valid = validate_data_config(
    {"source": {"kind": "text", "path": "x"}, "tokenizer": {"kind": "byte", "path": None}}
  )
  assert valid["source"] == {"kind": "text", "path": "x"}
  assert valid["tokenizer"] == {"kind": "byte"}
  cfg = default_data_config()
  cfg.source = {"kind": "my_kind", "anything": 1}  # kinds a custom build_source defines
  assert validate_data_config(cfg)["source"] == {"kind": "my_kind", "anything": 1}


def _lcjax_imports(tree):
  """(module, names, is_top_level) for every import of an lcjax module in a parsed file."""
  top = set(map(id, tree.body))
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lcjax"):
      yield node.module, node.names, id(node) in top
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("lcjax"):
          yield alias.name, [], id(node) in top


def test_data_modules_import_lcjax_at_top_without_cycles():
  graph = {}
  for path in sorted(DATA_DIR.glob("*.py")):
    if path.name == "__init__.py":
      continue
    name = f"lcjax.data.{path.stem}"
    graph[name] = set()
    for module, _names, top_level in _lcjax_imports(ast.parse(path.read_text())):
      assert top_level, f"{name} imports {module} inside a function; import it at module top"
      assert module != "lcjax.data", f"{name} imports from the lcjax.data package; use a sibling"
      if module.startswith("lcjax.data."):
        graph[name].add(module)
  assert graph.keys() >= {"lcjax.data.config", "lcjax.data.pipeline"}

  def visit(node, path):
    assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
    for child in graph.get(node, ()):
      visit(child, [*path, node])

  for node in graph:
    visit(node, [])


def test_config_dicts_round_trip_through_json():
  cfg = default_data_config()
  cfg.source.update(kind="jsonl", path=["a/*.jsonl", "b/*.jsonl"], splits={"train": "a/*.jsonl"})
  cfg.mixture = [{"source": {"kind": "stdlib"}, "weight": 1.0}]
  restored = ml_collections.ConfigDict(json.loads(cfg.to_json_best_effort()))
  assert restored.source.path == ["a/*.jsonl", "b/*.jsonl"]
  assert restored.mixture == [{"source": {"kind": "stdlib"}, "weight": 1.0}]


def test_anchor_scheme_from_the_command_line_starts_every_row_with_bos(tmp_path):
  texts = [f"document {i} " * (i + 1) for i in range(12)]  # some longer than a row
  write_jsonl(tmp_path / "a.jsonl", texts)
  cfg = parse_config(
    tmp_path,
    "--config.data.source.kind=jsonl",
    f"--config.data.source.path={tmp_path}/a.jsonl",
    "--config.data.source.validation_fraction=0",
    "--config.data.position_scheme=anchor",
    "--config.data.seq_len=32",
  )
  bos = build_tokenizer({"kind": "byte"}).bos_id
  it = make_train_iterator(cfg.data, batch_size=4, seed=0)
  tokens = np.concatenate([next(it)["tokens"] for _ in range(4)])
  assert np.all(tokens[:, 0] == bos) and not np.any(tokens[:, 1:] == bos)


def test_anchor_scheme_rejects_decomposition():
  """Decomposed rows are slices of one document: no shared BOS anchor to start them."""
  cfg = default_data_config()
  cfg.position_scheme = "anchor"
  cfg.seq_len = 64
  cfg.decomposition = {}
  with pytest.raises(ConfigError, match=r"data.position_scheme='anchor' .* data.decomposition"):
    validate_data_config(cfg)


@pytest.mark.parametrize(
  "scheme, anchor, match",
  [
    ("anchor", False, r"data.position_scheme='anchor' needs model.anchor=True"),
    ("global", True, r"model.anchor=True needs data.position_scheme='anchor'"),
    ("per_document", True, r"model.anchor=True needs data.position_scheme='anchor'"),
    ("anchor", True, None),
    ("global", False, None),
  ],
)
def test_anchor_scheme_and_model_anchor_must_agree(scheme, anchor, match):
  """AnchorAttention is the packer's shared BOS anchor and the model's anchor mask together."""
  from lcjax.train.config import base_config, validate_config

  c = base_config()
  c.data.position_scheme = scheme
  c.model.anchor = anchor
  if match is None:
    validate_config(c, num_devices=1)
  else:
    with pytest.raises(ConfigError, match=match):
      validate_config(c, num_devices=1)


def test_anchor_scheme_needs_a_model_with_an_anchor_mask():
  from lcjax.models import mamba2_config
  from lcjax.train.config import base_config, validate_config

  c = base_config()
  c.model = mamba2_config()
  c.data.position_scheme = "anchor"
  with pytest.raises(ConfigError, match=r"model.family='mamba2' has no attention mask"):
    validate_config(c, num_devices=1)
