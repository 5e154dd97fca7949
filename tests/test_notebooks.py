"""Every notebook in notebooks/ runs top to bottom on tiny settings (code cells exec'd in order)."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
  # Not the repository: a notebook must find configs through lcjax, as on Colab.
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("LCJAX_NOTEBOOK_STEPS", "6")
  with open(path) as f:
    cells = json.load(f)["cells"]
  namespace: dict = {"__name__": "__notebook__"}
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    source = "\n".join(
      line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))
    )
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
