"""Check the built site in a real browser: `python docs/check.py` (after `python docs/build.py`).

Serves `_site/` on localhost and opens every page in headless Chromium (the system's, `/usr/bin/chromium`, driven
by Playwright). Fails on: any request that leaves localhost (it is blocked and reported), a local file that does not
load (404), an image that does not decode, TeX that MathJax left unrendered, and a broken local link or `#anchor`
(checked in the HTML of every page). Writes screenshots of the front page and one chapter to `_build/screens/`.
"""
from __future__ import annotations
import argparse, configparser, functools, html.parser, re, sys, threading, time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BROWSER_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync']


class Page(html.parser.HTMLParser):
    "The ids an HTML page defines and the links it makes (`<a href>`, `<img src>`, `<link href>`, `<script src>`)."
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.canonical = set(), [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'link' and a.get('rel') == 'canonical': self.canonical = a.get('href')
        for k in ('id', 'name'):
            if a.get(k) and (k == 'id' or tag == 'a'): self.ids.add(a[k])
        for k in ('href', 'src'):
            if a.get(k) and tag in ('a', 'img', 'link', 'script', 'iframe', 'source'): self.links.append((tag, a[k]))


@functools.cache
def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(errors='replace'))
    return p


def pages(site: Path) -> list[Path]:
    "The site's pages: every HTML file but the theme's template fragments in `_static/`."
    return sorted(p for p in site.rglob('*.html') if '_static' not in p.relative_to(site).parts)


def published_url() -> str:
    "Where the site is published: `doc_host` + `doc_baseurl` of settings.ini."
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / 'settings.ini')
    return cfg['DEFAULT']['doc_host'].rstrip('/') + cfg['DEFAULT']['doc_baseurl'].rstrip('/') + '/'


def wrong_canonical(site: Path, url: str) -> list[str]:
    "Pages whose canonical address is not their place under the published URL."
    bad = []
    for page in pages(site):
        rel = page.relative_to(site).as_posix()
        c = parse(page).canonical
        if c is not None and c != url + rel: bad.append(f'{rel}: canonical {c}, expected {url + rel}')
    return bad


def broken_links(site: Path) -> tuple[list[str], int, int]:
    "Local links to missing files or missing anchors, over every page; also the counts of local and external links."
    bad, n_local, n_ext = [], 0, 0
    for page in pages(site):
        for tag, link in parse(page).links:
            u = urlsplit(link)
            if u.scheme in ('http', 'https', 'mailto') or link.startswith('//'):
                n_ext += 1
                continue
            if u.scheme in ('data', 'javascript'): continue
            n_local += 1
            target = page if not u.path else (page.parent / unquote(u.path)).resolve()
            if target.is_dir(): target = target / 'index.html'
            rel = page.relative_to(site)
            if not target.is_file() or site.resolve() not in target.resolve().parents:
                bad.append(f'{rel}: <{tag}> {link} -> no such file')
            elif u.fragment and target.suffix == '.html' and unquote(u.fragment) not in parse(target).ids:
                bad.append(f'{rel}: <{tag}> {link} -> no #{u.fragment} in {target.relative_to(site.resolve())}')
    return bad, n_local, n_ext


# visible text outside code and rendered math that still looks like TeX: \command, $...$, \( \[
RAW_TEX_JS = r"""() => {
  const bad = [];
  const skip = n => n.closest('pre, code, script, style, mjx-container, .highlight, textarea, .MathJax');
  const w = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  for (let n = w.nextNode(); n; n = w.nextNode()) {
    if (skip(n.parentElement)) continue;
    const t = n.textContent;
    if (/\\[a-zA-Z]{2,}|\$[^$\s][^$]*\$|\\\(|\\\[/.test(t)) bad.push(t.trim().slice(0, 80));
  }
  for (const m of document.querySelectorAll('.math'))
    if (!m.querySelector('mjx-container')) bad.push('unrendered: ' + m.textContent.trim().slice(0, 80));
  return bad;
}"""
BROKEN_IMAGES_JS = "() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
MATHJAX_READY_JS = ("() => window.MathJax && MathJax.startup && MathJax.startup.promise"
                    " ? MathJax.startup.promise.then(() => true) : false")


def serve(site: Path) -> tuple[ThreadingHTTPServer, str]:
    "`site` on a free localhost port, in a thread."
    quiet = type('Quiet', (SimpleHTTPRequestHandler,), {'log_message': lambda *a: None})
    handler = functools.partial(quiet, directory=str(site))
    srv = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'


def browse(site: Path, shots: Path, chromium: str, shot_pages=('index.html', '00_haar.html')) -> dict:
    "Open every page in headless Chromium; returns the problems found per kind and the number of math elements."
    from playwright.sync_api import sync_playwright
    srv, base = serve(site)
    found = {'network': [], 'http_error': [], 'image': [], 'raw_tex': []}
    n_math = 0
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            ctx = browser.new_context(viewport={'width': 1280, 'height': 900}, service_workers='block')
            def route(r):
                url = r.request.url
                if url.startswith(base) or url.startswith(('data:', 'blob:', 'about:')): return r.continue_()
                found['network'].append(f'{current}: {url}')
                r.abort()
            ctx.route('**/*', route)
            page = ctx.new_page()
            def response(resp):
                if resp.status >= 400: found['http_error'].append(f'{current}: {resp.status} {resp.url}')
            page.on('response', response)
            for f in pages(site):
                current = f.relative_to(site).as_posix()
                page.goto(base + current, wait_until='load')
                if page.evaluate(MATHJAX_READY_JS):
                    n_math += page.evaluate("() => document.querySelectorAll('mjx-container').length")
                found['image'] += [f'{current}: {s}' for s in page.evaluate(BROKEN_IMAGES_JS)]
                found['raw_tex'] += [f'{current}: {s}' for s in page.evaluate(RAW_TEX_JS)]
                if current in shot_pages: page.screenshot(path=str(shots / (Path(current).stem + '.png')))
            browser.close()
    finally:
        srv.shutdown()
    return found, n_math


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--site', default=str(ROOT / '_site'), help='the built site (default: _site)')
    ap.add_argument('--shots', default=str(ROOT / '_build/screens'),
                    help='where the screenshots go (default: _build/screens)')
    ap.add_argument('--chromium', default='/usr/bin/chromium', help="the browser (Debian's package chromium)")
    a = ap.parse_args(argv)
    site, t0 = Path(a.site), time.time()
    if not (site / 'index.html').is_file():
        sys.exit(f'{site}/index.html not found: build the site first, python docs/build.py')
    if not Path(a.chromium).is_file():
        sys.exit(f'{a.chromium} not found: install Chromium (Debian: apt-get install chromium)')
    n_pages = len(pages(site))
    bad_links, n_local, n_ext = broken_links(site)
    found, n_math = browse(site, Path(a.shots), a.chromium)
    found['link'] = bad_links
    found['canonical'] = wrong_canonical(site, published_url())
    if not parse(site / 'index.html').canonical: found['canonical'].append('index.html names no canonical address')
    for kind, items in found.items():
        for s in items[:20]: print(f'{kind}: {s}')
        if len(items) > 20: print(f'{kind}: ... and {len(items) - 20} more')
    counts = ', '.join(f'{len(v)} {k}' for k, v in found.items())
    print(f'{n_pages} pages in Chromium, {n_local} local links checked ({n_ext} external, not followed), '
          f'{n_math} formulas rendered; problems: {counts}; screenshots in {a.shots}; {time.time() - t0:.0f} s')
    if any(found.values()): sys.exit(1)


if __name__ == '__main__': main()
