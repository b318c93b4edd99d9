"A new model through the run layer and the command line: what a reader writes to add a sixth model."
import importlib, json, os, sys
from types import SimpleNamespace
import pytest, torch
from conftest import run_cli
from wavenb.learner import Learner

TOY = '''
import torch, torch.nn.functional as F
from torch import nn
from wavenb.data import Collate
from wavenb.learner import Learner, save_config
from wavenb.metrics import accuracy
from wavenb.run import train_test, run_callbacks, add_command, load_model

def build_toy(cfg): return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, cfg['width']), nn.ReLU(), nn.Linear(cfg['width'], 10))

def train_toy(data: str = 'sample', split: str | None = None, test_data: str | None = None, size: int | None = None,
              width: int = 32,  # hidden units
              steps: int = 100, minutes: float | None = None, batch_size: int = 64, lr: float = 1e-3, warmup: int = 10,
              ema: float = 0.0, ckpt: str = 'runs/toy', ckpt_every: int = 1000, out: str = 'figures/toy',
              device: str | None = None, seed: int = 0, compile: bool = False, workers: int = 0) -> dict:
    "Train a toy classifier."
    train, test, cfg = train_test(data, split, test_data, size, 200, seed)
    cfg = save_config(ckpt, dict(cfg, width=width))
    torch.manual_seed(seed); model = build_toy(cfg)
    report = lambda L: dict(test_acc=L.evaluate(ds=test, metrics={'acc': accuracy})['acc'])
    cbs = run_callbacks(ckpt, out, warmup, minutes, ema=ema, ckpt_every=ckpt_every, dataset=train, metrics_fn=report, config=cfg)
    return Learner(model, train, F.cross_entropy, batch_size=batch_size, lr=lr, seed=seed, device=device, compile=compile,
                   num_workers=workers, collate=Collate(), valid_collate=Collate(), cbs=cbs).fit(steps).results

def add_cli(cmds): add_command(cmds['train'], 'toy', train_toy)
'''

def test_a_new_model_trains_from_the_command_line(tmp_path):
    (tmp_path / 'toymodel.py').write_text(TOY)
    env = dict(WAVENB_PLUGINS='toymodel', PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    h = run_cli('train', 'toy', '--help', env=env)
    assert h.returncode == 0 and '--width WIDTH' in h.stdout and 'hidden units' in h.stdout, h.stderr
    r = run_cli('train', 'toy', '--steps', 150, '--lr', 3e-3, '--ckpt', tmp_path / 'ck', '--out', tmp_path / 'out', '--device', 'cpu', env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert m['steps'] == 150 and m['config']['width'] == 32 and m['metrics']['test_acc'] > 0.15   # chance: 0.10
    r2 = run_cli('train', 'toy', '--width', 64, '--ckpt', tmp_path / 'ck', '--out', tmp_path / 'out', env=env)
    assert r2.returncode != 0 and 'another configuration' in r2.stderr                              # a resumed folder keeps its config


TRAINERS = ['wavenb.vqvae:train_vqvae', 'wavenb.wno:train_wno', 'wavenb.wmsa:train_classifier',
            'wavenb.codec:train_flow', 'wavenb.diffusion:train_diffusion']

@pytest.mark.parametrize('trainer', TRAINERS)
def test_seed_sets_the_initial_weights(tmp_path, monkeypatch, trainer):
    "`--seed` means the same in every train command: the same seed gives the same initial weights, another seed others."
    mod, name = trainer.split(':')
    train = getattr(importlib.import_module(mod), name)
    def first_weights(self, steps, cbs=()):   # stands in for the training: hands back the weights it would start from
        return SimpleNamespace(results={k: v.clone() for k, v in self.raw_model.state_dict().items()})
    monkeypatch.setattr(Learner, 'fit', first_weights)
    w = [train(ckpt=str(tmp_path / f'ck{i}'), out=str(tmp_path / f'out{i}'), seed=s, steps=1) for i, s in enumerate((0, 0, 1))]
    floats = [k for k, v in w[0].items() if v.is_floating_point()]
    assert all(torch.equal(w[0][k], w[1][k]) for k in floats)
    assert any(not torch.equal(w[0][k], w[2][k]) for k in floats)
