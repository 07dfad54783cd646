"""launch/colab_tpu.ipynb: valid nbformat 4, and its code cells run on CPU.

The cells run top to bottom in one namespace, in a subprocess (so matplotlib,
JAX state and the working directory stay out of the test process), with the
tiny config and the install cell (tagged ``install``) skipped.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")


def _load():
  with open(NOTEBOOK) as f:
    return json.load(f)


def test_notebook_is_nbformat4():
  nb = _load()
  assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("code", "markdown")
    assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and "execution_count" in cell
      compile("".join(cell["source"]), "cell", "exec")  # valid Python, no magics
  tags = [c["metadata"].get("tags", []) for c in nb["cells"] if c["cell_type"] == "code"]
  assert ["install"] in tags


RUNNER = """
import json, sys
nb = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, cell in enumerate(nb["cells"]):
  if cell["cell_type"] != "code" or "install" in cell["metadata"].get("tags", []):
    continue
  print(f"=== cell {i}", flush=True)
  exec(compile("".join(cell["source"]), f"cell-{i}", "exec"), namespace)
print("NOTEBOOK OK", sorted(k for k in ("gen_summary", "bench", "rows") if k in namespace))
"""


@pytest.mark.slow
def test_notebook_code_cells_run_on_cpu(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
             SPECDEC_CONFIG="configs/tiny.py", SPECDEC_WORKDIR=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RUNNER), NOTEBOOK],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "NOTEBOOK OK ['bench', 'gen_summary', 'rows']" in proc.stdout
  assert (tmp_path / "generate" / "results.jsonl").exists()
  assert (tmp_path / "sweep" / "notebook_sweep.png").exists()
  with open(tmp_path / "sweep" / "results.jsonl") as f:
    assert sorted(json.loads(line)["point"]["decode.k"] for line in f) == [1, 4]
