# Sphinx configuration of the course website. docs/build.py copies this file into the staging folder it builds
# from; run that script rather than sphinx-build directly.
import configparser, os
from pathlib import Path

_root = Path(os.environ['WAVENB_ROOT'])   # the repository, set by docs/build.py
_cfg = configparser.ConfigParser(interpolation=None)
_cfg.read(_root / 'settings.ini')
_s = _cfg['DEFAULT']

project = _s['title']
author = _s['author']
copyright = _s['copyright']
release = version = _s['version']
html_title = f"{_s['title']}: {_s['description'].split(':')[0]}"
html_baseurl = _s['doc_host'].rstrip('/') + _s['doc_baseurl'].rstrip('/') + '/'   # where the site is published

extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.viewcode']
# figures/README.md is a page; the rest of figures/ only files
exclude_patterns = ['_build', '**.ipynb_checkpoints', 'figures/*/**']
root_doc = 'index'

# notebooks are shown with their committed outputs, never executed here
nb_execution_mode = 'off'
nb_merge_streams = True
nb_render_markdown_format = 'myst'   # markdown outputs (results tables) with tables and math
nb_ipywidgets_js = {}                 # no widget scripts from a CDN
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3
suppress_warnings = ['mystnb.unknown_mime_type', 'myst.header']

# MathJax 3 (SVG output, no web fonts) from the site itself: docs/build.py copies it into _static
mathjax_path = 'mathjax/tex-svg-full.js'

# the API reference: names as the package exports them, markdown-style `code` in docstrings shown as code
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
default_role = 'code'

html_theme = 'sphinx_book_theme'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_theme_options = {
    'repository_url': _s['git_url'],
    'use_repository_button': True,
    'show_toc_level': 2,
    'home_page_in_toc': True,
}
html_show_sourcelink = False


# The package's docstrings are written in markdown (nbdev's convention), autodoc reads reStructuredText: turn
# `code`, $math$ and lone * into their reStructuredText forms before autodoc parses them.
import re

_MD = re.compile(r'`([^`]+)`|\$([^$\n]+)\$|\*')


def _md_to_rst(line: str) -> str:
    def sub(m):
        end = m.end()
        tail = '\\ ' if end < len(line) and (line[end].isalnum() or line[end] == '_') else ''
        if m.group(1) is not None: return f'``{m.group(1)}``{tail}'
        if m.group(2) is not None: return f':math:`{m.group(2)}`{tail}'
        return '\\*'
    return _MD.sub(sub, line)


def _docstring_md(app, what, name, obj, options, lines):
    lines[:] = [_md_to_rst(l) for l in lines]


def setup(app):
    app.connect('autodoc-process-docstring', _docstring_md)
