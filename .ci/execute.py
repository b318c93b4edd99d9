"""Run notebooks and save their outputs (what a reader sees on GitHub), skipping cells flagged `slow`/`cuda`.

    python .ci/execute.py                 # every notebook in nbs/
    python .ci/execute.py 00_haar 01_data # some of them
Then run nbdev_clean. CI does not run this; nbdev_test checks the same cells.
"""
import os, sys, time
from pathlib import Path
from execnb.shell import CaptureShell
from execnb.nbio import read_nb, write_nb

nbs = Path(__file__).resolve().parent.parent / 'nbs'
flags = ('#| slow', '#| cuda', '#|slow', '#|cuda')
os.chdir(nbs)
names = [n if n.endswith('.ipynb') else n + '.ipynb' for n in sys.argv[1:]] or sorted(p.name for p in nbs.glob('[!_]*.ipynb'))
for name in names:
    t, nb = time.time(), read_nb(name)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    sh = CaptureShell()
    sh.run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type == 'code' and (c.source.lstrip().startswith(flags) or '#| eval: false' in c.source))
    write_nb(nb, name)
    print(f'{name}: {time.time() - t:.1f}s, {Path(name).stat().st_size / 1e3:.0f} kB')
