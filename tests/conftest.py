import os, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / 'shared'

@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    "Each test session gets its own wavenb cache, so no test reads another run's cached data."
    monkeypatch.setenv('WAVENB_CACHE', str(tmp_path_factory.getbasetemp() / 'cache'))

def run_cli(*args, cwd=None, env=None):
    "Run the installed `wavenb` console script as a user would."
    e = dict(os.environ, **(env or {}))
    return subprocess.run(['wavenb', *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, env=e, timeout=600)

@pytest.fixture
def one_thread():
    "Small float64 convolutions run faster on one thread (and do not fight other processes for the cores)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
