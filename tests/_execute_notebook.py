"""Execute one notebook top to bottom in a fresh Jupyter kernel; used by test_notebooks.py.

    python tests/_execute_notebook.py notebooks/04_full_vs_lora_mlp.ipynb
    python tests/_execute_notebook.py --write notebooks/04_full_vs_lora_mlp.ipynb

The kernel's working directory is the notebook's own folder, as under ``jupyter lab
notebooks/``, and BLAS runs one thread unless you set ``OPENBLAS_NUM_THREADS`` etc. (so every
printed digit is the same from run to run). Without ``--write`` nothing is written back to the
notebook file (what the tests do); with ``--write`` the executed notebook replaces the file
(how a committed notebook is made). On success prints one JSON line, ``{"seconds": ...}``
(kernel start to last cell); on the first failing cell prints nbclient's error (the cell and
its traceback) to stderr, writes nothing and exits 1.
"""

import argparse
import json
import os
import pathlib
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")         # inherited by the kernel

import nbclient  # noqa: E402
import nbformat  # noqa: E402

TIMEOUT_PER_CELL = 120          # seconds; a notebook should take well under 30 s in total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Execute a notebook top to bottom in a fresh kernel.")
    p.add_argument("path")
    p.add_argument("--write", action="store_true", help="save the executed notebook in place")
    args = p.parse_args(argv)
    path = pathlib.Path(args.path).resolve()
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
    if args.write:
        nbformat.write(nb, path)
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
