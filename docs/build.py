"""Build the course website offline: `python docs/build.py` -> `_site/index.html`.

The notebooks in `nbs/` are rendered with their committed outputs (nothing is executed): every chapter, the
results they show, an API reference generated from the exported `wavenb` package, search, and MathJax served
from the site itself (no request leaves the machine). Sphinx + myst-nb + sphinx-book-theme, installed by the
`docs` extra: `pip install -e ".[docs]"`. (`nbdev_docs` still works for those who have Quarto: it reads
`nbs/_quarto.yml`.)

Steps: copy each notebook into a staging folder as a reader should see it (nbdev's `#|` directive lines and the
`default_exp` cells removed, exported cells tagged, progress-bar carriage returns and ANSI codes resolved, the
`../figures/` links made relative to the site), add the chapter list and the API page, then `sphinx-build`.
"""
from __future__ import annotations
import argparse, json, os, re, shutil, subprocess, sys, time
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r'^\s*#\|\s*(\S+)[^\n]*\n?', re.MULTILINE)
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')


def chapters(nbs: Path) -> list[Path]:
    "The notebooks in reading order: `index` first, then by file name (`00_haar`, `01_data`, ...)."
    nbs_ = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    if not any(p.stem == 'index' for p in nbs_):
        raise FileNotFoundError(f'{nbs}/index.ipynb: the front page is missing')
    return sorted(nbs_, key=lambda p: (p.stem != 'index', p.name))


def clean_stream(text: str) -> str:
    "What a terminal shows for `text`: ANSI codes dropped, each line cut after its last carriage return (tqdm)."
    text = ANSI.sub('', text)
    return '\n'.join(line.rsplit('\r', 1)[-1] for line in text.split('\n'))


def stage_cell(cell: dict) -> dict | None:
    "One cell as the site shows it, or None to leave it out (a cell of directives only, e.g. `default_exp`)."
    src = ''.join(cell['source'])
    if cell['cell_type'] == 'markdown':
        src = src.replace('](../figures/', '](figures/').replace('src="../figures/', 'src="figures/')
        return {**cell, 'source': src}
    if cell['cell_type'] != 'code': return cell
    names = DIRECTIVE.findall(src)
    body = DIRECTIVE.sub('', src).strip('\n')
    if not body: return None
    tags = list(cell.get('metadata', {}).get('tags', []))
    if 'export' in names: tags.append('exported')
    outputs = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': o = {**o, 'text': clean_stream(''.join(o['text']))}
        elif o.get('output_type') == 'error': o = {**o, 'traceback': [ANSI.sub('', t) for t in o['traceback']]}
        outputs.append(o)
    return {**cell, 'source': body, 'outputs': outputs, 'metadata': {**cell.get('metadata', {}), 'tags': tags}}


def module_of(nb: dict) -> str | None:
    "The module a notebook exports to (its `#| default_exp`), if any."
    for c in nb['cells']:
        m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.MULTILINE)
        if c['cell_type'] == 'code' and m: return m.group(1)
    return None


def title_of(nb: dict, path: Path) -> str:
    "The chapter's title: the first markdown heading."
    for c in nb['cells']:
        m = re.match(r'#\s+(.+)', ''.join(c['source']).lstrip()) if c['cell_type'] == 'markdown' else None
        if m: return m.group(1).strip()
    raise ValueError(f'{path}: no "# Title" heading in any markdown cell; every chapter needs one')


def stage_notebook(src: Path, dst: Path) -> dict:
    "Write the reader's copy of notebook `src` to `dst`; returns the original notebook."
    nb = json.loads(src.read_text())
    cells = [c for c in map(stage_cell, nb['cells']) if c is not None]
    if src.stem == 'index':   # the front page is also the README: its links start at the repository root
        for c in cells:
            if c['cell_type'] == 'markdown': c['source'] = c['source'].replace('](nbs/', '](')
    dst.write_text(json.dumps({**nb, 'cells': cells}, indent=1, ensure_ascii=False))
    return nb


def toctree(caption: str, docs: list[str]) -> str:
    "A hidden MyST toctree: the site's navigation."
    return '```{toctree}\n:hidden:\n:caption: ' + caption + '\n\n' + '\n'.join(docs) + '\n```\n'


def api_page(mods: list[tuple[str, str, str]]) -> str:
    "The API reference: each exported module's members (autodoc), linked to the chapter that derives them."
    parts = ['# API reference\n',
             'Every function and class the notebooks export to the `wavenb` package, module by module, each with the '
             'chapter that derives and checks it. (In the chapters, cells exported to the package have a thick blue '
             'bar on their left.)\n']
    for mod, doc, title in mods:
        parts.append(f'## `wavenb.{mod}`\n\nDerived in [{title}]({doc}.ipynb).\n\n'
                     f'```{{eval-rst}}\n.. automodule:: wavenb.{mod}\n   :members:\n   :undoc-members:\n```\n')
    return '\n'.join(parts)


def mathjax_file() -> Path:
    "MathJax 3's `tex-svg-full.js` (no web fonts needed) from the `django-static-mathjax` package."
    spec = find_spec('mathjax')
    f = Path(spec.origin).parent / 'static/mathjax/es5/tex-svg-full.js' if spec and spec.origin else None
    if f is None or not f.is_file():
        raise SystemExit('MathJax not found: install the docs extra, pip install -e ".[docs]" (django-static-mathjax)')
    return f


def stage(stage_dir: Path) -> int:
    "Lay out the Sphinx source folder; returns the number of notebooks."
    if stage_dir.exists(): shutil.rmtree(stage_dir)
    (stage_dir / '_static/mathjax').mkdir(parents=True)
    shutil.copytree(ROOT / 'figures', stage_dir / 'figures')
    shutil.copy(mathjax_file(), stage_dir / '_static/mathjax/tex-svg-full.js')
    shutil.copy(ROOT / 'docs/conf.py', stage_dir / 'conf.py')
    shutil.copy(ROOT / 'docs/custom.css', stage_dir / '_static/custom.css')
    nbs = chapters(ROOT / 'nbs')
    mods, docs = [], []
    for p in nbs:
        nb = stage_notebook(p, stage_dir / p.name)
        if p.stem == 'index': continue
        docs.append(p.stem)
        if (mod := module_of(nb)): mods.append((mod, p.stem, title_of(nb, p)))
    (stage_dir / 'api.md').write_text(api_page(mods))
    index = stage_dir / 'index.ipynb'
    nb = json.loads(index.read_text())
    nav = toctree('Course', docs) + '\n' + toctree('Reference', ['api', 'figures/README'])
    nb['cells'].append({'cell_type': 'markdown', 'id': 'site-navigation', 'metadata': {}, 'source': nav})
    index.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    return len(nbs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default=str(ROOT / '_site'), help='the built site (default: _site)')
    ap.add_argument('--stage', default=str(ROOT / '_build/site_src'),
                    help='the staging folder (default: _build/site_src)')
    ap.add_argument('--jobs', default='auto', help="sphinx-build's -j (default: auto, one per core)")
    ap.add_argument('--strict', action='store_true', help='fail on any Sphinx warning')
    a = ap.parse_args(argv)
    t0 = time.time()
    n = stage(Path(a.stage))
    out = Path(a.out)
    if out.exists(): shutil.rmtree(out)
    scratch = out.resolve().parent / 'jupyter_execute'    # myst-nb's working copies of the notebooks, beside the output
    had_scratch = scratch.exists()
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-j', a.jobs, a.stage, str(out)]
    if a.strict: cmd += ['-W', '--keep-going']
    r = subprocess.run(cmd, env={**os.environ, 'WAVENB_ROOT': str(ROOT)})
    if not had_scratch: shutil.rmtree(scratch, ignore_errors=True)
    if r.returncode: raise SystemExit(f'sphinx-build failed ({r.returncode}): {" ".join(cmd)}')
    pages = sum(1 for p in out.rglob('*.html') if '_static' not in p.relative_to(out).parts)
    mb = sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20
    print(f'built {out}/index.html: {n} notebooks, {pages} pages, {mb:.1f} MB, {time.time() - t0:.0f} s')


if __name__ == '__main__': main()
