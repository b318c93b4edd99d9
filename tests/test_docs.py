"""The website's build and browser-check scripts (docs/build.py, docs/check.py): staging rules and the link checks,
no Sphinx or browser needed."""
import importlib.util, json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

def load(name):
    spec = importlib.util.spec_from_file_location(f'wavenb_docs_{name}', ROOT / 'docs' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

build, check = load('build'), load('check')

def code(src, outputs=()):
    return {'cell_type': 'code', 'metadata': {}, 'source': src, 'outputs': list(outputs), 'execution_count': 1}
def md(src): return {'cell_type': 'markdown', 'metadata': {}, 'source': src}

def test_clean_stream():
    assert build.clean_stream('fit:  10%\rfit: 100%\ndone \x1b[32mok\x1b[0m') == 'fit: 100%\ndone ok'

def test_stage_cell():
    assert build.stage_cell(code('#| default_exp haar\n')) is None               # directives only: left out
    out = {'output_type': 'stream', 'name': 'stdout', 'text': ['a\rb\n']}
    c = build.stage_cell(code('#| export\ndef f(x): return x\n', [out]))
    assert c['source'] == 'def f(x): return x' and c['metadata']['tags'] == ['exported']
    assert c['outputs'][0]['text'] == 'b\n'
    assert build.stage_cell(code('#| slow\nx = 1'))['metadata']['tags'] == []   # other directives: untagged
    assert build.stage_cell(md('![grid](../figures/a/b.png) <img src="../figures/c.png">'))['source'] == \
        '![grid](figures/a/b.png) <img src="figures/c.png">'

def test_chapters_and_titles(tmp_path):
    for n in ('10_b', '00_a', 'index', '_private'): (tmp_path / f'{n}.ipynb').write_text('{}')
    assert [p.stem for p in build.chapters(tmp_path)] == ['index', '00_a', '10_b']
    (tmp_path / 'index.ipynb').unlink()
    with pytest.raises(FileNotFoundError, match='front page'): build.chapters(tmp_path)
    nb = {'cells': [code('#| default_exp haar'), md('# The Haar transform\n\n> text')]}
    assert build.title_of(nb, Path('x')) == 'The Haar transform' and build.module_of(nb) == 'haar'
    with pytest.raises(ValueError, match='no "# Title"'): build.title_of({'cells': [md('text')]}, Path('x.ipynb'))

def test_stage_notebook_index_links(tmp_path):
    src = tmp_path / 'index.ipynb'
    links = '[00_haar](nbs/00_haar.ipynb), [figures](figures/README.md)'
    src.write_text(json.dumps({'cells': [md(links)], 'metadata': {}}))
    build.stage_notebook(src, tmp_path / 'out.ipynb')
    staged = json.loads((tmp_path / 'out.ipynb').read_text())['cells'][0]['source']
    assert staged == '[00_haar](00_haar.ipynb), [figures](figures/README.md)'

def site(tmp_path, pages):
    for name, body in pages.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f'<html><head>{body[0]}</head><body>{body[1]}</body></html>')
    return tmp_path

def test_broken_links(tmp_path):
    index = ('<a href="a.html#sec">ok</a> <a href="a.html#nope">x</a> <a href="gone.html">y</a>'
             '<img src="_images/p.png"> <a href="https://example.org/">ext</a> <a href="#top">self</a>')
    s = site(tmp_path, {'index.html': ('', index),
                        'a.html': ('', '<h1 id="sec">S</h1><a href="index.html">b</a><a href="../outside.html">o</a>'),
                        'sub/b.html': ('', '<p id="top">b</p><a href="../a.html#sec">up</a>')})
    bad, n_local, n_ext = check.broken_links(s)
    assert bad == ['a.html: <a> ../outside.html -> no such file',
                   'index.html: <a> a.html#nope -> no #nope in a.html',
                   'index.html: <a> gone.html -> no such file',
                   'index.html: <img> _images/p.png -> no such file',
                   'index.html: <a> #top -> no #top in index.html']
    assert (n_local, n_ext) == (8, 1)

def test_wrong_canonical(tmp_path):
    url = 'https://wavenb.github.io/wavenb/'
    s = site(tmp_path, {'index.html': (f'<link rel="canonical" href="{url}index.html">', ''),
                        'a.html': ('<link rel="canonical" href="https://elsewhere.io/a.html">', '')})
    assert check.wrong_canonical(s, url) == [f'a.html: canonical https://elsewhere.io/a.html, expected {url}a.html']
    assert check.published_url() == url       # settings.ini's doc_host + doc_baseurl

def test_mathjax_is_local():
    pytest.importorskip('mathjax', reason='the docs extra is not installed')
    f = build.mathjax_file()
    assert f.name == 'tex-svg-full.js' and f.stat().st_size > 1_000_000
