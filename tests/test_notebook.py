"""The quickstart notebook runs top to bottom on CPU."""

import os
import time

import nbclient
import nbformat

_NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "notebooks", "quickstart.ipynb")


def test_quickstart_runs():
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  start = time.time()
  nbclient.NotebookClient(
      nb, timeout=180, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(_NOTEBOOK)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  assert time.time() - start < 120
