"""Execute one notebook top to bottom in a fresh Jupyter kernel; used by test_notebooks.py.

    python tests/_execute_notebook.py notebooks/04_full_vs_lora_mlp.ipynb

The kernel's working directory is the notebook's own folder, as under ``jupyter lab
notebooks/``. Nothing is written back to the notebook file. On success prints one JSON line,
``{"seconds": ...}`` (kernel start to last cell); on the first failing cell prints nbclient's
error (the cell and its traceback) to stderr and exits 1.
"""

import json
import pathlib
import sys
import time

import nbclient
import nbformat

TIMEOUT_PER_CELL = 120          # seconds; a notebook should take well under 30 s in total


def main(path: str) -> int:
    path = pathlib.Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_PER_CELL, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        print(err, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    if errors:
        print(f"error outputs after execution: {errors[:1]}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
