"The `wavenb` console script end to end, as a user runs it."
import json
import numpy as np, pytest, torch
from PIL import Image
from conftest import run_cli, ROOT

@pytest.mark.parametrize('cmd', [[], ['demo'], ['data'], ['pack'], ['fid']])
def test_help(cmd):
    r = run_cli(*cmd, '--help')
    assert r.returncode == 0 and 'usage: wavenb' in r.stdout

def test_no_command_is_an_error():
    r = run_cli()
    assert r.returncode == 2 and 'COMMAND' in r.stderr

def test_data_describes_the_sample():
    r = run_cli('data', '--json')
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d['images'] == 2000 and d['shape'] == [3, 32, 32] and len(d['sha256']) == 64

def test_user_errors_are_one_line(tmp_path):
    r = run_cli('data', tmp_path / 'missing.npz')
    assert r.returncode == 2 and 'missing.npz' in r.stderr and 'Traceback' not in r.stderr
    r = run_cli('fid', 'sample', 'sample', '--weights', tmp_path / 'nope.pt')
    assert r.returncode == 2 and 'nope.pt' in r.stderr and 'Traceback' not in r.stderr

def test_pack_folder_then_describe(tmp_path):
    rng = np.random.default_rng(0)
    for c in ('a', 'b'):
        (tmp_path / 'tree' / c).mkdir(parents=True)
        for i in range(3): Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / 'tree' / c / f'{i}.jpg')
    r = run_cli('pack', tmp_path / 'tree', tmp_path / 'x.npz', '--split', 'test')
    assert r.returncode == 0, r.stderr
    d = json.loads(run_cli('data', f'{tmp_path / "x.npz"}:test', '--json').stdout)
    assert d['images'] == 6 and d['per_class'] == {'a': 3, 'b': 3}

def test_fid_end_to_end_with_a_torchscript_network(tmp_path):
    # a small TorchScript network with the FID network's interface: [-1, 1] 299x299 in, features out
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.manual_seed(0); torch.jit.script(net).save(str(tmp_path / 'net.pt'))
    assert run_cli('pack', 'data/cifar10-sample.npz', tmp_path / 'a.npz', '--per-class', '10', '--seed', '1').returncode == 0
    assert run_cli('pack', 'data/cifar10-sample.npz', tmp_path / 'b.npz', '--per-class', '10', '--seed', '2').returncode == 0
    r = run_cli('fid', tmp_path / 'a.npz', tmp_path / 'b.npz', '--weights', tmp_path / 'net.pt', '--device', 'cpu',
                '--out', tmp_path / 'res', env={'WAVENB_CACHE': str(tmp_path / 'cache')})
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['metrics']['fid'] > 0 and m['metrics']['n_real'] == m['metrics']['n_fake'] == 100
    assert m['reference']['images'] == 100 and m['device'].startswith('CPU')
    r2 = run_cli('fid', tmp_path / 'a.npz', tmp_path / 'a.npz', '--weights', tmp_path / 'net.pt', '--device', 'cpu',
                 env={'WAVENB_CACHE': str(tmp_path / 'cache')})
    assert abs(json.loads(r2.stdout)['fid']) < 1e-6

def test_demo_writes_figures_and_checks(tmp_path):
    r = run_cli('demo', '--out', tmp_path / 'demo')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'demo' / 'metrics.json').read_text())
    assert m['metrics']['all_match_pywt_1e5']
    assert {p.name for p in (tmp_path / 'demo').iterdir()} == {'subbands.png', 'pyramid.png', 'energy.png', 'metrics.json'}

def test_python_m_without_install(tmp_path):
    "On a bare machine (the GPU box) the CLI runs from the tree: PYTHONPATH=. python -m wavenb.cli."
    import subprocess, sys, os
    r = subprocess.run([sys.executable, '-m', 'wavenb.cli', 'data', '--json'], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), WAVENB_GIT_COMMIT='0' * 40))
    assert r.returncode == 0 and json.loads(r.stdout)['images'] == 2000

def test_bench_haar_writes_results(tmp_path):
    r = run_cli('bench', 'haar', '--shapes', '2,3,8,8', '--dtypes', 'float32', '--device', 'cpu', '--min-run-time', '0.01',
                '--out', tmp_path / 'b')
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    impls = {row['impl'] for row in m['metrics']['rows'] if 'median_ms' in row}
    assert {'copy', 'wavenb torch'} <= impls and (tmp_path / 'b' / 'bench.png').is_file()
    assert set(m['versions']) >= {'triton', 'pytorch_wavelets', 'ptwt'}

# Every option shared by the commands is declared once (wavenb.run.SHARED) and means the same in every command.
TRAIN_SHARED = ['data', 'split', 'test_data', 'steps', 'minutes', 'batch_size', 'lr', 'warmup', 'ema', 'ckpt', 'ckpt_every',
                'out', 'device', 'seed', 'compile', 'workers']

def _commands(parser, path=()):
    "Every leaf sub-command of `parser`: `(path, subparser)`."
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs: yield path, parser
    for a in subs:
        for name, p in a.choices.items(): yield from _commands(p, path + (name,))

def _all_commands():
    from wavenb.cli import build_parser
    return list(_commands(build_parser()))

def test_shared_options_have_one_meaning():
    from wavenb.run import SHARED
    seen, trains = {}, 0
    for path, p in _all_commands():
        if path[0] not in ('train', 'sample', 'eval'): continue     # the models' commands (demo, data, pack, fid have their own)
        acts = {a.dest: a for a in p._actions}
        if path[0] == 'train':
            trains += 1
            missing = [k for k in TRAIN_SHARED if k not in acts]
            assert not missing, f'wavenb {" ".join(path)} lacks {missing}'
            # every model but the integer flow (exact arithmetic in float32) trains in a chosen precision
            assert ('precision' in acts) == (path[1] != 'flow'), path
        for k, a in acts.items():
            if k not in SHARED: continue
            if path[0] == 'train': assert (a.help or '').startswith(SHARED[k]), (path, k, a.help)   # one help text ...
            seen.setdefault(k, set()).add((type(a).__name__, a.type, tuple(a.option_strings)))   # ... one type, one spelling
    assert trains >= 6
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}

def test_every_command_has_help():
    "Every sub-command formats its --help (in process; the per-model tests run `wavenb MODEL --help` as a user does)."
    for path, p in _all_commands():
        h = p.format_help()
        assert h.startswith(f'usage: wavenb {" ".join(path)}') and len(h.splitlines()) > 3, path
