"wavenb.diffusion on the CPU: forward process statistics, conversions, spaces, samplers, training through the Learner."
import math
import pytest, torch
import torch.nn.functional as F
from torch import nn
from wavenb.data import load_images, Collate, to_float
from wavenb.learner import Learner
from wavenb.diffusion import (Schedule, WaveletSpace, DiffusionCB, sample, ddim_invert, ddim_steps, target,
                              PREDICTIONS)

@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_q_sample_statistics(kind):
    s = Schedule(1000, kind)
    g = torch.Generator().manual_seed(0)
    for t in (0, 100, 600, 999):
        n = 40000
        x0 = torch.full((n, 1), -0.4)
        xt = s.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=g))
        ab = s.alpha_bar[t].item()
        assert abs(xt.mean().item() - math.sqrt(ab) * -0.4) < 5 * math.sqrt((1 - ab) / n) + 1e-6
        assert abs(xt.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n) + 1e-6

def test_schedule_errors_and_steps():
    with pytest.raises(ValueError, match='linear.*cosine'): Schedule(10, 'sigmoid')
    assert ddim_steps(1000, 4) == [999, 666, 333, 0] and len(ddim_steps(1000, 1000)) == 1000
    with pytest.raises(ValueError, match='steps'): ddim_steps(10, 0)
    with pytest.raises(ValueError, match='pred'): target('score', *torch.zeros(3, 1))

@pytest.mark.parametrize('level', [1, 2])
@pytest.mark.parametrize('wavelet', ['haar', 'db2'])
def test_wavelet_space_is_exactly_invertible(level, wavelet):
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1
    sp = WaveletSpace(3, level, wavelet).double()
    sp.fit_scales(x)
    z = sp.encode(x)
    assert z.shape == (4, 3 * 4 ** level, 16 // 2 ** level, 16 // 2 ** level)
    assert (sp.decode(z) - x).abs().max() < 1e-12
    with pytest.raises(ValueError, match='channels'): sp.encode(torch.zeros(1, 1, 16, 16, dtype=torch.float64))

def test_wavelet_space_level1_is_the_stacked_dwt():
    from wavenb.haar import dwt2_stacked
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(WaveletSpace(3, 1).encode(x), dwt2_stacked(x).flatten(1, 2))

class Exact(nn.Module):
    "The optimal denoiser for data concentrated at one image m (any prediction type)."
    def __init__(self, m, sched, pred):
        super().__init__(); self.m, self.sched, self.pred, self.p = m, sched, pred, nn.Parameter(torch.zeros(1))
    def forward(self, x, t):
        ab = self.sched.ab(t, x)
        eps = (x - ab.sqrt() * self.m) / (1 - ab).sqrt()
        return target(self.pred, self.m.expand_as(x), eps, ab)

@pytest.mark.parametrize('pred', PREDICTIONS)
@pytest.mark.parametrize('sampler,steps', [('ddim', 20), ('ddpm', None)])
def test_samplers_recover_a_point_mass(pred, sampler, steps):
    "With the optimal denoiser for a single image, every sampler must produce that image."
    sched = Schedule(1000, 'linear')
    m = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    out = sample(Exact(m, sched, pred), sched, (3, 3, 8, 8), sampler=sampler, steps=steps or 50, pred=pred,
                 generator=torch.Generator().manual_seed(0))
    assert (out - m).abs().max() < 1e-3

@pytest.mark.parametrize('pred', PREDICTIONS)
def test_ddim_inversion_roundtrip_and_determinism(pred):
    sched = Schedule(1000, 'cosine')
    m = torch.rand(1, 3, 8, 8) * 2 - 1
    model = Exact(m, sched, pred)
    zT = ddim_invert(model, sched, m.expand(2, -1, -1, -1), steps=30, pred=pred)
    assert torch.isfinite(zT).all()
    back = sample(model, sched, (2, 3, 8, 8), steps=30, pred=pred, noise=zT, clip=False)
    assert (back - m).abs().max() < 1e-4
    a = sample(model, sched, (2, 3, 8, 8), steps=10, pred=pred, noise=zT)
    assert torch.equal(a, sample(model, sched, (2, 3, 8, 8), steps=10, pred=pred, noise=zT))
    with pytest.raises(ValueError, match='noise has shape'): sample(model, sched, (2, 3, 8, 8), noise=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match='sampler'): sample(model, sched, (2, 3, 8, 8), sampler='euler')

def test_training_through_the_learner_lowers_the_loss():
    ds = load_images(limit=512)
    sched, space = Schedule(200, 'cosine'), WaveletSpace(3, 1)
    space.fit_scales(to_float(ds.images, 'symmetric'))
    torch.manual_seed(0)
    class Net(nn.Module):  # the noise level enters as one extra input channel
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(13, 48, 3, padding=1), nn.SiLU(), nn.Conv2d(48, 48, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(48, 12, 3, padding=1))
        def forward(self, x, t):
            return self.net(torch.cat([x, (t.float() / sched.T).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])], 1))
    L = Learner(Net(), ds, F.mse_loss, batch_size=32, lr=2e-3, collate=Collate(scale='symmetric'),
                cbs=[DiffusionCB(sched, space, 'v')])
    L.fit(150)
    h = L.history['loss']
    assert sum(h[-20:]) / 20 < 0.8 * sum(h[:20]) / 20

def test_cli_train_resume_sample(tmp_path):
    from conftest import run_cli
    args = ['train', 'diffusion', '--width', '16', '--blocks', '1', '--batch-size', '16', '--warmup', '2', '--sample-steps', '3',
            '--ckpt', tmp_path / 'ck', '--out', tmp_path / 'res', '--ckpt-every', '5', '--backbone', 'ukan']
    r = run_cli(*args, '--steps', '6')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*args, '--steps', '10')                         # continues from the checkpoint at step 6
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    import json
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['steps'] == 10 and m['config']['backbone'] == 'ukan' and len(m['config']['scales']) == 12
    r = run_cli('sample', 'diffusion', '--ckpt', tmp_path / 'ck', '--n', '4', '--steps', '3', '--out', tmp_path / 's.png', '--device', 'cpu')
    assert r.returncode == 0 and (tmp_path / 's.png').is_file(), r.stderr[-2000:]
    r = run_cli('sample', 'diffusion', '--ckpt', tmp_path / 'nothing')
    assert r.returncode == 2 and 'config.json' in r.stderr

class ConvDenoiser(nn.Module):
    def __init__(self): super().__init__(); self.c = nn.Conv2d(12, 12, 3, padding=1)
    def forward(self, x, t): return self.c(x)

def test_fid_curve_survives_resume(tmp_path):
    "The FID curve is checkpointed: a resumed run keeps its earlier points and adds new ones at the right steps."
    from wavenb.diffusion import FIDCurveCB
    from wavenb.learner import CheckpointCB, EMACB
    from wavenb.metrics import FIDKID, RandomFeatures
    ds = load_images(limit=64)
    sched, space = Schedule(100, 'cosine'), WaveletSpace(3, 1)
    fk = FIDKID(RandomFeatures()).set_real(ds)
    def run(steps):
        torch.manual_seed(0)
        model = ConvDenoiser()
        cb = FIDCurveCB(lambda m, b: sample(m, sched, (b, 3, 32, 32), space, 'ddim', 2, pred='v'), fk, n=16, every=4, batch=16)
        L = Learner(model, ds, F.mse_loss, batch_size=8, collate=Collate(scale='symmetric'),
                    cbs=[DiffusionCB(sched, space, 'v'), EMACB(0.9), CheckpointCB(tmp_path, every=4), cb])
        L.fit(steps)
        return cb.curve
    first = run(6)
    assert [p['step'] for p in first] == [4, 6]
    again = run(10)                                 # resumes from step 6 (the checkpoint written at the end of fit)
    assert [p['step'] for p in again] == [4, 6, 8, 10] and again[:2] == first

def test_time_budget_band_scaling_and_matched_ukan(tmp_path):
    from wavenb.diffusion import train_diffusion
    m = train_diffusion('sample', steps=10_000, batch_size=8, width=16, blocks=1, ckpt=tmp_path / 'ck', out=tmp_path / 'res', warmup=2,
                        sample_steps=2, minutes=0.05, band_scaling=False, backbone='ukan', match_unet=True, device='cpu', mix_levels=(1, 2))
    import json
    r = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert r['steps'] < 10_000 and r['train_time_s'] >= 3.0 and r['time_budget_min'] == 0.05
    assert r['config']['scales'] == [1.0] * 12 and r['config']['band_scaling'] is False
    from wavenb.unet import UNet, n_params
    assert r['config']['mix_levels'] == [1, 2]
    unet = n_params(UNet(12, 16, (1, 2, 2), 1, (1, 2), 'unet'))
    assert r['config']['width'] < 16 and abs(r['parameters'] - unet) / unet < 0.1
    with pytest.raises(ValueError, match='mix_levels'): train_diffusion('sample', steps=1, ckpt=tmp_path / 'ck3', out=tmp_path / 'res3', mix_levels=(3,))
    with pytest.raises(FileNotFoundError, match='FID network not found'):
        train_diffusion('sample', steps=1, ckpt=tmp_path / 'ck2', out=tmp_path / 'res2', eval_samples=10, fid_weights=tmp_path / 'missing.pt')

def test_cli_bench_and_eval(tmp_path):
    from conftest import run_cli
    import json
    r = run_cli('eval', 'diffusion', tmp_path / 'none')
    assert r.returncode == 2 and 'metrics.json' in r.stderr
    for name, fids, ips in (('pixel', [20.0, 10.0], 100.0), ('wavelet', [9.5, 8.0], 400.0)):
        (tmp_path / name).mkdir()
        curve = [dict(step=i, train_time_s=60.0 * (i + 1), fid=f, kid=0.0) for i, f in enumerate(fids)]
        (tmp_path / name / 'metrics.json').write_text(json.dumps(dict(parameters=2e6, images_per_s=ips, train_time_s=120.0,
                                                      config=dict(space=name, levels=1, backbone='unet'), metrics=dict(fid=fids[-1], fid_curve=curve))))
    r = run_cli('eval', 'diffusion', tmp_path / 'pixel', tmp_path / 'wavelet', '--out', tmp_path / 'cmp')
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / 'cmp' / 'metrics.json').read_text())['metrics']['rows']
    assert [x['speedup'] for x in rows] == [1.0, 2.0] and (tmp_path / 'cmp' / 'fid_vs_time.png').is_file()
    from wavenb.diffusion import bench_diffusion
    rows = bench_diffusion({'t': dict(channels=12, size=8, width=8, mults=(1, 2), mix_levels=(1,))}, impls=('wavenb',), batch_sizes=(2,),
                           device='cpu', steps=1, warmup=1)
    assert rows[0]['params'] > 0 and rows[0]['train_images_per_s'] > 0
    with pytest.raises(ValueError, match='impl'): bench_diffusion(impls=('keras',), device='cpu')
