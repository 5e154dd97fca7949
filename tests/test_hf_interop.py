"""lcjax ↔ transformers: logits match in float32 for every model type and rope type."""

import ast
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_fixtures import MODEL_TYPES, ODD_HEAD_DIM, ROPE_CASES, hf_config, hf_logits, hf_model
from safetensors.numpy import load_file, save_file

from lcjax.interop.hf import (
  CheckpointError,
  config_from_hf,
  config_to_hf,
  load_pretrained,
  save_pretrained,
)
from lcjax.models import build_model
from lcjax.models.config import head_dim

# float32 end to end; the two frameworks sum in different orders, so logits of
# magnitude ~10 differ by ~1e-6 relative. 1e-4 absolute is the bound.
ATOL = 1e-4


@nnx.jit
def _logits(model, tokens):
  """The forward as one compiled program (eagerly it compiles op by op)."""
  return model(tokens)


def _tokens(seed=0, shape=(2, 64)):
  return np.random.default_rng(seed).integers(0, 128, size=shape)


@pytest.mark.parametrize("rope_name", sorted(ROPE_CASES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_load_pretrained_matches_transformers(tmp_path, model_type, rope_name):
  torch_model = hf_model(hf_config(model_type, ROPE_CASES[rope_name]))
  torch_model.save_pretrained(tmp_path)
  tokens = _tokens()
  want = hf_logits(torch_model, tokens)
  assert want.std() > 1.0  # the weights are large enough for a mismatch to show

  model, cfg = load_pretrained(str(tmp_path))
  assert cfg.hf_model_type == model_type
  got = np.asarray(jax.jit(lambda t: model(t))(tokens))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_name", sorted(ROPE_CASES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_pretrained_loads_in_transformers(tmp_path, model_type, rope_name):
  torch_model = hf_model(hf_config(model_type, ROPE_CASES[rope_name]), seed=1)
  cfg = config_from_hf(torch_model.config.to_dict())
  model = _random_lcjax(cfg, seed=3)
  save_pretrained(model, cfg, str(tmp_path / "out"))

  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert type(loaded).__name__ == type(torch_model).__name__
  tokens = _tokens(seed=1)
  want = np.asarray(_logits(model, tokens))
  loaded.config._attn_implementation = "eager"
  np.testing.assert_allclose(hf_logits(loaded, tokens), want, atol=ATOL, rtol=0)


def _random_lcjax(cfg, seed):
  """An lcjax model with weights large enough that logits vary (as in hf_fixtures)."""
  model = build_model(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [
    (1.0 + 0.2 * jax.random.normal(k, x.shape))
    if x.ndim == 1 and "norm" in str(p)
    else 0.15 * jax.random.normal(k, x.shape)
    for k, x, p in zip(keys, leaves, jax.tree.leaves_with_path(state), strict=True)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_head_dim_not_hidden_over_heads_round_trips(tmp_path, model_type):
  """transformers → lcjax → transformers with head_dim != hidden_size / num_attention_heads.

  All three types read `config.head_dim` (Qwen2Config keeps it as an extra key), so
  lcjax must import it and write it back; yarn makes the rotary frequencies depend on it.
  """
  torch_model = hf_model(hf_config(model_type, ROPE_CASES["yarn"], head_dim=ODD_HEAD_DIM))
  assert torch_model.model.layers[0].self_attn.q_proj.out_features == 4 * ODD_HEAD_DIM
  torch_model.save_pretrained(tmp_path / "hf")
  tokens = _tokens()  # the shape of the other tests: their compiled ops are reused
  want = hf_logits(torch_model, tokens)

  model, cfg = load_pretrained(str(tmp_path / "hf"))
  assert head_dim(cfg) == ODD_HEAD_DIM
  np.testing.assert_allclose(np.asarray(_logits(model, tokens)), want, atol=ATOL, rtol=0)

  save_pretrained(model, cfg, str(tmp_path / "out"))
  assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == ODD_HEAD_DIM
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  loaded.config._attn_implementation = "eager"
  np.testing.assert_allclose(hf_logits(loaded, tokens), want, atol=ATOL, rtol=0)


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
  config = hf_config("llama", ROPE_CASES["default"], tie_word_embeddings=True)
  torch_model = hf_model(config)
  torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  model, cfg = load_pretrained(str(tmp_path))
  assert cfg.tie_embeddings
  tokens = _tokens()
  np.testing.assert_allclose(
    np.asarray(_logits(model, tokens)), hf_logits(torch_model, tokens), atol=ATOL
  )

  # lcjax writes shards too, and a re-save as one file removes the old shards.
  save_pretrained(model, cfg, str(tmp_path / "re"), max_shard_bytes=40_000)
  assert os.path.exists(tmp_path / "re" / "model.safetensors.index.json")
  again, _ = load_pretrained(str(tmp_path / "re"))
  np.testing.assert_array_equal(
    np.asarray(_logits(again, tokens)), np.asarray(_logits(model, tokens))
  )
  save_pretrained(model, cfg, str(tmp_path / "re"))
  assert sorted(os.listdir(tmp_path / "re")) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("head_dim_override", [{}, {"head_dim": ODD_HEAD_DIM}])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_round_trip(model_type, head_dim_override):
  hf = hf_config(model_type, ROPE_CASES["yarn"], **head_dim_override).to_dict()
  cfg = config_from_hf(hf)
  assert head_dim(cfg) == head_dim_override.get("head_dim", 64 // 4)
  assert config_from_hf(config_to_hf(cfg)).to_dict() == cfg.to_dict()


def test_unsupported_model_type_names_the_key(tmp_path):
  hf_model(hf_config("llama", ROPE_CASES["default"])).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"config\.json: model_type='gpt2' is not supported"):
    load_pretrained(str(tmp_path))


def test_missing_tensor_names_the_tensor(tmp_path):
  hf_model(hf_config("llama", ROPE_CASES["default"])).save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    load_pretrained(str(tmp_path))


def test_missing_weights_file_and_bad_rope(tmp_path):
  hf_model(hf_config("llama", ROPE_CASES["default"])).save_pretrained(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    load_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="'factor'"):
    config_from_hf(
      {
        **hf_config("llama", ROPE_CASES["default"]).to_dict(),
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4},
      }
    )
  with pytest.raises(ValueError, match="spiral"):
    config_from_hf(
      {
        **hf_config("llama", ROPE_CASES["default"]).to_dict(),
        "rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4},
      }
    )


def _imported_modules(nodes) -> set[str]:
  """Modules named by the import statements among `nodes` (`from a import b` names a and a.b)."""
  names = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_interop_imports_go_one_way():
  """hf → hf_mamba2 → safetensors_io, never back; lcjax modules imported at module top."""
  for file in sorted((pathlib.Path(__file__).parents[1] / "lcjax" / "interop").glob("*.py")):
    tree = ast.parse(file.read_text())
    top = _imported_modules(tree.body)
    in_functions = _imported_modules(
      node
      for fn in ast.walk(tree)
      if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
      for node in ast.walk(fn)
    )
    assert not [m for m in in_functions if m.startswith("lcjax")], file.name
    if file.stem in ("hf_mamba2", "safetensors_io"):
      assert "lcjax.interop.hf" not in top, f"{file.name} imports lcjax.interop.hf"
    if file.stem == "safetensors_io":
      assert not [m for m in top if m.startswith("lcjax")], "safetensors_io imports lcjax"
