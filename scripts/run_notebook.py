"""Execute notebooks top to bottom and save their outputs in place (what a code host shows).

    python scripts/run_notebook.py notebooks/ablations.ipynb --size full
    python scripts/run_notebook.py notebooks/*.ipynb            # the small size the tests run

The size reaches the notebooks as ``FIPO_NOTEBOOK_SIZE``. Warnings and progress bars (stderr
streams) are left out of the saved file; an error in any cell stops with that cell's traceback and
leaves the file unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def strip_stderr(notebook) -> None:
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not (o.output_type == "stream" and o.name == "stderr")]


def run(path: str, size: str, timeout_s: int) -> float:
    import nbformat
    from nbclient import NotebookClient

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["FIPO_NOTEBOOK_SIZE"] = size
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    strip_stderr(notebook)
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="notebook files")
    parser.add_argument("--size", default="small", choices=("small", "full"))
    parser.add_argument("--timeout-s", type=int, default=3600, help="per cell")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.endswith(".ipynb") or not os.path.isfile(path):
            parser.error(f"{path}: not a notebook file")
    for path in args.paths:
        print(f"{path}: executed at size {args.size} in {run(path, args.size, args.timeout_s):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
