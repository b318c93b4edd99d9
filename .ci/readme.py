"""Write README.md from nbs/index.ipynb (what `nbdev_readme` does with Quarto, which cannot be installed offline).

Markdown cells are copied as they are; code cells become ```python blocks, their text outputs ``` blocks.
`python .ci/readme.py --check` exits 1 if README.md is out of date.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root / 'nbs' / 'index.ipynb').read_text())
parts = []
for c in nb['cells']:
    src = ''.join(c['source']).strip()
    if not src or src.startswith('#| hide'): continue
    if c['cell_type'] == 'markdown': parts.append(src)
    elif c['cell_type'] == 'code':
        parts.append(f'```python\n{src}\n```')
        for o in c.get('outputs', []):
            text = o.get('text') or o.get('data', {}).get('text/plain')
            if text: parts.append('```\n' + ''.join(text).rstrip() + '\n```')
readme = '<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(parts) + '\n'
if '--check' in sys.argv:
    if (root / 'README.md').read_text() != readme: sys.exit('README.md is out of date: run python .ci/readme.py')
else: (root / 'README.md').write_text(readme)
