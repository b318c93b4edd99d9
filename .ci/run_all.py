"""Run every notebook top to bottom in a real Jupyter kernel (nbclient + ipykernel), as a reader's "Run All" does:
every cell, flagged or not, on this machine (GPU-only cells skip themselves without CUDA). Outputs are not saved.

    python .ci/run_all.py                 # every notebook in nbs/
    python .ci/run_all.py 00_haar 99_cli  # some of them
"""
import sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

nbs = Path(__file__).resolve().parent.parent / 'nbs'
names = [n if n.endswith('.ipynb') else n + '.ipynb' for n in sys.argv[1:]] or sorted(p.name for p in nbs.glob('[!_]*.ipynb'))
failed = []
for name in names:
    t, nb = time.time(), nbformat.read(nbs / name, as_version=4)
    try:
        NotebookClient(nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': str(nbs)}}).execute()
        print(f'run all: {name:24s} {time.time() - t:6.1f}s', flush=True)
    except CellExecutionError as e:
        failed.append(name)
        print(f'run all: {name:24s} FAILED after {time.time() - t:.1f}s\n{str(e)[-3000:]}', flush=True)
if failed: sys.exit(f"these notebooks stop with an error under Run All: {' '.join(failed)}")
