"""scripts/convert_hf.py: HF folder -> lcjax params folder -> HF folder, verified by logits."""

import importlib.util
import os

import numpy as np
import pytest
from hf_fixtures import ROPE_CASES, hf_config, hf_logits, hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert_main():
  spec = importlib.util.spec_from_file_location("convert_hf", f"{ROOT}/scripts/convert_hf.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


# `make test` runs the README's two convert commands with --verify (logits against
# transformers both ways) in tests/test_readme_commands.py; this is the same round trip
# with a YaRN Qwen2 and an exact logits check after it.
@pytest.mark.slow
def test_round_trip_through_lcjax_params(tmp_path, capsys):
  main = _convert_main()
  torch_model = hf_model(hf_config("qwen2", ROPE_CASES["yarn"]))
  torch_model.save_pretrained(tmp_path / "hf")
  assert (
    main(
      ["--to", "lcjax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "lc"), "--verify"]
    )
    == 0
  )
  assert (
    main(["--to", "hf", "--src", str(tmp_path / "lc"), "--dst", str(tmp_path / "back"), "--verify"])
    == 0
  )
  out = capsys.readouterr().out
  assert out.count("max |logits(lcjax) - logits(transformers)|") == 2

  import transformers

  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
  back.config._attn_implementation = "eager"
  tokens = np.random.default_rng(0).integers(0, 128, size=(1, 40))
  np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(torch_model, tokens), atol=1e-5)


def test_bad_source_is_one_line_error(tmp_path, capsys):
  main = _convert_main()
  assert main(["--to", "lcjax", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path)]) == 2
  assert "config.json: not found" in capsys.readouterr().err
