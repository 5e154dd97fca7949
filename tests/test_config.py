import pytest

from lcjax.config import ConfigError, load_config, parse_arg


def test_parse_arg_types_and_flags():
  cfg = parse_arg(
    "method=yarn,runlocal,steps=7,lr=3e-4", method="default", runlocal=False, steps=10, lr=1e-3
  )
  assert (cfg.method, cfg.runlocal, cfg.steps, cfg.lr) == ("yarn", True, 7, 3e-4)
  assert parse_arg(None, steps=3).steps == 3
  assert parse_arg("runlocal=false", runlocal=True).runlocal is False


@pytest.mark.parametrize(
  "arg, match",
  [
    ("runlocall", "'runlocall' is unknown"),
    ("steps=ten", "steps='ten' is not an integer"),
    ("steps", "needs a value"),
    ("runlocal=maybe", "not a boolean"),
  ],
)
def test_parse_arg_errors(arg, match):
  with pytest.raises(ConfigError, match=match):
    parse_arg(arg, runlocal=False, steps=10)


def _load_config(name, arg):
  return load_config(f"configs/{name}.py" + (f":{arg}" if arg else ""))


@pytest.mark.parametrize(
  "name, arg",
  [
    ("quickstart", "tiny"),
    ("quickstart", None),
    ("longgen_hybrid", "tiny"),
    ("longgen_hybrid", None),
    ("longgen_hybrid", "tiny,sparse=strided"),
    ("longgen_hybrid", "sparse=strided"),
    ("llama3_8b_long", "runlocal"),
  ],
)
def test_shipped_configs_validate(name, arg):
  """Every shipped config (and its small variants) passes validation before tracing."""
  from lcjax.models.config import layer_types
  from lcjax.train.config import validate_config

  config = _load_config(name, arg)
  validate_config(config, num_devices=1 if "llama3" not in name else None)
  if arg and "strided" in arg:
    assert "strided_attention" in layer_types(config.model)


def test_longgen_config_rejects_an_unknown_sparse_layer():
  with pytest.raises(ConfigError, match="sparse='dilated' is unknown"):
    _load_config("longgen_hybrid", "sparse=dilated")


def test_load_config_applies_dotted_overrides_and_rejects_unknown_fields():
  config = load_config("configs/quickstart.py:tiny", {"train.steps": 7})
  assert config.train.steps == 7
  with pytest.raises(ConfigError, match=r"override train\.stepz: config\.train has no field"):
    load_config("configs/quickstart.py:tiny", {"train.stepz": 7})
  with pytest.raises(ConfigError, match=r"override train\.steps='many'"):
    load_config("configs/quickstart.py:tiny", {"train.steps": "many"})
  with pytest.raises(ConfigError, match="config arg 'tinyy' is unknown"):
    load_config("configs/quickstart.py:tinyy")
  with pytest.raises(ConfigError, match="config file 'configs/nope.py' not found"):
    load_config("configs/nope.py")
  # A bare name finds the config in this checkout (or the installed lcjax.configs).
  assert load_config("quickstart:tiny").train.steps == 30


def test_command_line_overrides_of_missing_fields_fail_in_one_sentence():
  from lcjax.config import check_override_flags

  argv = ["--config", "configs/quickstart.py:tiny", "--config.data.source.kind=jsonl"]
  check_override_flags(argv)  # every field exists
  with pytest.raises(ConfigError, match=r"--config\.model\.nonexist: config\.model has no field"):
    check_override_flags(argv + ["--config.model.nonexist=3"])


def test_attention_settings_have_one_home():
  """config.attention / config.parallel decide what runs; the model section has no copy,
  and a model config that carries a disagreeing copy fails in one sentence."""
  from lcjax.models import llama_config
  from lcjax.train.run_model import build_run_model, model_config_for_run

  config = load_config(
    "configs/quickstart.py:tiny",
    {
      "attention.impl": "reference",
      "attention.block_q": 64,
      "parallel.context_strategy": "all_gather",
    },
  )
  model, cfg = build_run_model(config)
  attn = model.layer(0).self_attn
  assert (attn.impl, attn.block_q, attn.context_strategy) == ("reference", 64, "all_gather")
  assert "attention_impl" not in config.model
  from lcjax.config import check_override_flags

  with pytest.raises(ConfigError, match=r"config\.model has no field 'attention_impl'"):
    check_override_flags(["--config=configs/quickstart.py:tiny", "--config.model.attention_impl=x"])
  # A config file that sets a whole llama_config keeps the fields; they must agree.
  config = load_config("configs/quickstart.py:tiny", lock=False)
  config.model = llama_config(
    attention_impl="pallas", attention_block_q=128, attention_block_kv=128
  )
  with pytest.raises(
    ConfigError,
    match=r"model\.attention_impl='pallas' disagrees with config\.attention\.impl='auto'",
  ):
    model_config_for_run(config)
  config.attention.impl = "pallas"
  assert model_config_for_run(config).attention_impl == "pallas"


def test_a_mistyped_rope_type_is_a_config_error_naming_the_field():
  from lcjax.train.config import validate_config

  config = load_config("configs/quickstart.py:tiny", {"model.rope.rope_type": "yarnn"})
  with pytest.raises(ConfigError, match=r"model\.rope: rope type 'yarnn' is unknown"):
    validate_config(config, num_devices=1)
  config = load_config(
    "configs/quickstart.py:tiny", {"eval.rope_variants": {"y": {"rope_type": "yarn"}}}
  )
  with pytest.raises(ConfigError, match=r"eval\.rope_variants\.y: .*'rope_theta'\] is required"):
    validate_config(config, num_devices=1)


def test_a_perplexity_document_cut_below_the_longest_length_is_rejected():
  from lcjax.train.config import validate_config

  lengths = {"eval.ppl_lengths": (64, 128)}
  config = load_config(
    "configs/quickstart.py:tiny", {**lengths, "eval.ppl_max_tokens_per_document": 128}
  )
  with pytest.raises(ConfigError, match=r"eval\.ppl_max_tokens_per_document=128 is not above"):
    validate_config(config, num_devices=1)
  config = load_config(
    "configs/quickstart.py:tiny", {**lengths, "eval.ppl_max_tokens_per_document": 129}
  )
  validate_config(config, num_devices=1)


def test_sink_window_layers_without_sinks_are_rejected():
  from lcjax.models import llama_config, validate_model

  cfg = llama_config(layer_types=("sink_window_attention",) * 2, sparse_window=16, sparse_sinks=0)
  with pytest.raises(ConfigError, match="plain sliding window"):
    validate_model(cfg)


def test_llama_lm_is_a_deprecated_alias_of_decoder_lm():
  import lcjax.models as models

  with pytest.warns(DeprecationWarning, match="LlamaLM is now DecoderLM"):
    alias = models.LlamaLM
  assert alias is models.DecoderLM


def test_init_from_takes_the_architecture_from_the_checkpoint_and_training_fields_from_the_config(
  caplog,
):
  """With init_from: remat/dtype from config.model, architecture from the checkpoint (each
  replaced field named in a warning), model_overrides on top; overrides need init_from."""
  from lcjax.models import llama_config
  from lcjax.train.run_model import model_config_for_run

  checkpoint = llama_config(
    d_model=64, num_layers=3, rope=dict(rope_type="default", rope_theta=5e5)
  )
  config = load_config(
    "configs/quickstart.py:tiny",
    {
      "model.remat": "full",
      "init_from": "/ckpt",
      "model_overrides": {"rope": {"rope_type": "abf", "rope_theta": 8e6}},
    },
  )
  with caplog.at_level("WARNING"):
    cfg = model_config_for_run(config, checkpoint)
  assert (cfg.d_model, cfg.num_layers, cfg.remat, cfg.dtype) == (64, 3, "full", "float32")
  assert cfg.rope.rope_type == "abf" and cfg.rope.rope_theta == 8e6
  assert (
    "replaces config.model's" in caplog.text and "d_model=64 (checkpoint: 64)" not in caplog.text
  )
  assert "mlp_dim=176 (checkpoint: 352)" in caplog.text
  config = load_config("configs/quickstart.py:tiny", {"model_overrides": {"remat": "full"}})
  with pytest.raises(ConfigError, match="model_overrides=.* applies to an init_from checkpoint"):
    model_config_for_run(config)
