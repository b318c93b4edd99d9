"wavenb.diffusion on the CPU: forward process statistics, conversions, spaces, samplers, training through the Learner."
import json, math
import pytest, torch
import torch.nn.functional as F
from torch import nn
from wavenb.data import load_images, Collate, to_float
from wavenb.learner import Learner
from wavenb.diffusion import (Schedule, WaveletSpace, DiffusionCB, sample, ddim_invert, ddim_steps, target, time_to_fid,
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

def fitted_space(level, wavelet):
    "A wavelet space with per-band scales fitted on real images: the detail bands get small scales, so latents reach far beyond [-1, 1]."
    sp = WaveletSpace(3, level, wavelet)
    sp.fit_scales(to_float(load_images(limit=256).images[:, :, :16, :16], 'symmetric'))
    return sp

WAVELET_SPACES = [(1, 'haar'), (2, 'haar'), (2, 'db2')]

@pytest.mark.parametrize('level,wavelet,sampler,steps', [(l, w, 'ddim', 20) for l, w in WAVELET_SPACES] +
                         [(l, w, 'ddpm', None) for l, w in WAVELET_SPACES if w == 'haar'])   # (db2 DDPM: 1000 slower steps, same path)
@pytest.mark.parametrize('pred', PREDICTIONS)
def test_samplers_recover_a_point_mass_in_wavelet_space(level, wavelet, sampler, steps, pred, one_thread):
    "The optimal denoiser acts on the scaled coefficients; clipping is decode, clamp in pixels, encode (a clamp of the latents would move them)."
    sched, sp = Schedule(1000, 'linear'), fitted_space(level, wavelet)
    m = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    mz = sp.encode(m)
    assert mz.abs().max() > 3                           # so clamping in the space instead of in pixels would show
    model = Exact(mz, sched, pred)
    out = sample(model, sched, (3, 3, 16, 16), sp, sampler, steps or 50, pred=pred, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 16, 16) and (out - m).abs().max() < 1e-3
    big = m * 2                                         # over a third of it outside [-1, 1]: the last clipped x0 is the clamped image
    out = sample(Exact(sp.encode(big), sched, pred), sched, (2, 3, 16, 16), sp, sampler, steps or 50, pred=pred,
                 generator=torch.Generator().manual_seed(0))
    assert (out - big.clamp(-1, 1)).abs().max() < 1e-3

@pytest.mark.parametrize('level,wavelet', WAVELET_SPACES)
@pytest.mark.parametrize('pred', PREDICTIONS)
def test_ddim_inversion_roundtrip_in_wavelet_space(level, wavelet, pred, one_thread):
    sched, sp = Schedule(1000, 'cosine'), fitted_space(level, wavelet)
    m = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model = Exact(sp.encode(m), sched, pred)
    zT = ddim_invert(model, sched, m.expand(2, -1, -1, -1), sp, steps=30, pred=pred)
    assert zT.shape == sp.latent_shape((2, 3, 16, 16)) and torch.isfinite(zT).all()
    for clip in (False, True):
        back = sample(model, sched, (2, 3, 16, 16), sp, steps=30, pred=pred, noise=zT, clip=clip)
        assert (back - m).abs().max() < 1e-4, clip
    with pytest.raises(ValueError, match='noise has shape'): sample(model, sched, (2, 3, 16, 16), sp, noise=torch.zeros(2, 3, 16, 16))

def test_training_through_the_learner_lowers_the_loss(one_thread):
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
    from functools import partial
    from conftest import run_cli
    run_cli = partial(run_cli, env=dict(OMP_NUM_THREADS='1'))   # tiny convolutions: one thread is faster on a shared CPU
    args = ['train', 'diffusion', '--width', '16', '--blocks', '1', '--batch-size', '16', '--warmup', '2', '--sample-steps', '3',
            '--ckpt', tmp_path / 'ck', '--out', tmp_path / 'res', '--ckpt-every', '5', '--backbone', 'ukan']
    r = run_cli(*args, '--steps', '6')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*args, '--steps', '10')                         # continues from the checkpoint at step 6
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    import json
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['steps'] == 10 and m['config']['backbone'] == 'ukan' and len(m['config']['scales']) == 12
    r = run_cli('sample', 'diffusion', '--ckpt', tmp_path / 'ck', '--n', '4', '--sample-steps', '3', '--grid', tmp_path / 's.png', '--device', 'cpu')
    assert r.returncode == 0 and (tmp_path / 's.png').is_file(), r.stderr[-2000:]
    assert json.loads(r.stdout) | dict(sample_s=0) == dict(grid=str(tmp_path / 's.png'), images=4, shape=[3, 32, 32], sampler='ddim',
                                                          sample_steps=3, eta=0.0, seed=0, sample_s=0)
    r = run_cli('sample', 'diffusion', '--ckpt', tmp_path / 'nothing')
    assert r.returncode == 2 and 'config.json' in r.stderr

class ConvDenoiser(nn.Module):
    def __init__(self): super().__init__(); self.c = nn.Conv2d(12, 12, 3, padding=1)
    def forward(self, x, t): return self.c(x)

def test_fid_curve_survives_resume(tmp_path, one_thread):
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

def test_time_budget_band_scaling_and_matched_ukan(tmp_path, one_thread):
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

def write_results(folder, space, final_fid, curve_fids, times, ips, n=2000, sha='ab' * 32, net='inception-v3'):
    "A results folder as train_diffusion writes it: the FID curve at `n` samples per point, the final FID at 10k samples."
    import json
    folder.mkdir(parents=True)
    curve = [dict(step=100 * (i + 1), train_time_s=t, images_seen=0, fid=f, kid=0.0, samples=n, reference='CIFAR-10 train', feature_net=net)
             for i, (t, f) in enumerate(zip(times, curve_fids))]
    m = dict(fid=final_fid, kid=0.0, fid_samples=10_000, fid_feature_net=net, fid_curve=curve, fid_curve_samples=n,
             fid_curve_feature_net=net, fid_curve_reference=dict(name='CIFAR-10 train', sha256=sha, images=50_000))
    (folder / 'metrics.json').write_text(json.dumps(dict(steps=curve[-1]['step'], parameters=2e6, images_per_s=ips, train_time_s=times[-1],
                                                         config=dict(space=space, levels=1, backbone='unet'), metrics=m)))

def test_cli_bench_and_eval(tmp_path, one_thread):
    """The target is the reference's last FID-curve point (2k samples), not its final FID-10k (lower: FID is biased upward at small N),
    and the reference's own time is its time to that target, not its whole training time."""
    from conftest import run_cli
    import json
    r = run_cli('eval', 'diffusion', tmp_path / 'none')
    assert r.returncode == 2 and 'metrics.json' in r.stderr
    # pixel: final FID-10k 8.0; its 2k curve dips to 11.4 at 200 s, ends at 11.5 at 300 s. wavelet: first <= 11.5 at 150 s.
    write_results(tmp_path / 'pixel', 'pixel', 8.0, [30.0, 11.4, 11.5], [100.0, 200.0, 300.0], 100.0)
    write_results(tmp_path / 'wavelet', 'wavelet', 6.5, [20.0, 12.0, 11.0, 9.5], [50.0, 100.0, 150.0, 300.0], 400.0)
    r = run_cli('eval', 'diffusion', tmp_path / 'pixel', tmp_path / 'wavelet', '--out', tmp_path / 'cmp')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / 'cmp' / 'metrics.json').read_text())['metrics']
    rows = res['rows']
    assert [x['min_to_ref_fid'] for x in rows] == [round(200 / 60, 2), round(150 / 60, 2)]
    assert [x['speedup_to_ref_fid'] for x in rows] == [1.0, round(200 / 150, 2)]
    assert [x['throughput_ratio'] for x in rows] == [1.0, 4.0]
    assert res['target_fid'] == 11.5 and res['fid_curve_samples'] == 2000 and [x['fid'] for x in rows] == [8.0, 6.5]
    assert json.loads(r.stdout) == res                                          # the command prints what it wrote
    assert (tmp_path / 'cmp' / 'fid_vs_time.png').is_file()
    from wavenb.diffusion import compare_runs
    rows = compare_runs([tmp_path / 'wavelet', tmp_path / 'pixel'])             # the other way round: wavelet is the reference
    assert rows[0]['target_fid'] == 9.5 and rows[0]['min_to_ref_fid'] == 5.0 and rows[1]['min_to_ref_fid'] is None
    # curves measured with another sample count, against other reference statistics or with another network are refused
    write_results(tmp_path / 'w500', 'wavelet', 6.5, [20.0, 9.0], [50.0, 100.0], 400.0, n=500)
    write_results(tmp_path / 'wsvhn', 'wavelet', 6.5, [20.0, 9.0], [50.0, 100.0], 400.0, sha='cd' * 32)
    write_results(tmp_path / 'wnet', 'wavelet', 6.5, [20.0, 9.0], [50.0, 100.0], 400.0, net='random-features')
    with pytest.raises(ValueError, match='not comparable.*500 samples'): compare_runs([tmp_path / 'pixel', tmp_path / 'w500'])
    for other in ('wsvhn', 'wnet'):
        with pytest.raises(ValueError, match='not comparable'): compare_runs([tmp_path / 'pixel', tmp_path / other])
    m = json.loads((tmp_path / 'pixel' / 'metrics.json').read_text())
    del m['metrics']['fid_curve_reference']; (tmp_path / 'old').mkdir(); (tmp_path / 'old' / 'metrics.json').write_text(json.dumps(m))
    with pytest.raises(ValueError, match='does not record'): compare_runs([tmp_path / 'old', tmp_path / 'pixel'])
    m['metrics']['fid_curve'] = []; (tmp_path / 'old' / 'metrics.json').write_text(json.dumps(m))
    with pytest.raises(ValueError, match='no FID curve'): compare_runs([tmp_path / 'old'])
    m = json.loads((tmp_path / 'pixel' / 'metrics.json').read_text()); m['steps'] = 400   # a reference curve that stops before the end
    (tmp_path / 'old' / 'metrics.json').write_text(json.dumps(m))
    with pytest.raises(ValueError, match='not at its last training step'): compare_runs([tmp_path / 'old', tmp_path / 'pixel'])
    from wavenb.diffusion import bench_diffusion
    rows = bench_diffusion({'t': dict(channels=12, size=8, width=8, mults=(1, 2), mix_levels=(1,))}, impls=('wavenb',), batch_sizes=(2,),
                           device='cpu', timed_steps=1, untimed_steps=1, out=tmp_path / 'bench')
    assert rows[0]['params'] > 0 and rows[0]['train_images_per_s'] > 0
    assert json.loads((tmp_path / 'bench' / 'metrics.json').read_text())['metrics']['rows'] == rows
    with pytest.raises(ValueError, match='impl'): bench_diffusion(impls=('keras',), device='cpu')
    with pytest.raises(ValueError, match='unknown configurations'): bench_diffusion(('pixel-dpm',), device='cpu')

def test_train_diffusion_fid_curve_and_final_fid(tmp_path, one_thread):
    "The FID paths run end to end (random feature network): finite values, the right counts, a last curve point at the end of training."
    import json
    from wavenb.diffusion import train_diffusion, compare_runs
    from wavenb.metrics import RandomFeatures
    net = RandomFeatures()
    train_diffusion('sample', steps=6, batch_size=8, width=16, blocks=1, warmup=2, sample_steps=2, ckpt=tmp_path / 'ck', out=tmp_path / 'res',
                    fid_net=net, fid_every=4, fid_curve_samples=12, eval_samples=20, device='cpu')
    r = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    m, sha = r['metrics'], load_images().checksum
    assert math.isfinite(m['fid']) and math.isfinite(m['kid']) and m['fid'] >= 0
    assert (m['fid_samples'], m['fid_feature_net'], m['fid_reference_sha256']) == (20, net.ident, sha)
    c = m['fid_curve']
    assert [p['step'] for p in c] == [4, 6] and r['steps'] == 6                 # every 4 steps, and at the end of training
    assert all(math.isfinite(p['fid']) and p['samples'] == 12 and p['feature_net'] == net.ident and p['reference_sha256'] == sha for p in c)
    assert c[0]['train_time_s'] < c[1]['train_time_s'] and abs(c[-1]['train_time_s'] - r['train_time_s']) < 0.01
    assert m['fid_curve_samples'] == 12 and m['fid_curve_reference']['sha256'] == sha and m['fid_curve_feature_net'] == net.ident
    assert (tmp_path / 'res' / 'fid_vs_time.png').is_file()
    rows = compare_runs([tmp_path / 'res', tmp_path / 'res'])
    assert rows[0]['target_fid'] == c[-1]['fid'] and rows[0]['fid_curve_samples'] == 12
    assert rows[0]['min_to_ref_fid'] == round(time_to_fid(c, c[-1]['fid']) / 60, 2) and [x['speedup_to_ref_fid'] for x in rows] == [1.0, 1.0]

def test_cli_help_lists_the_shared_options():
    "Every diffusion command takes its options from its function; the shared ones carry the shared help, renamed ones are gone."
    from conftest import run_cli
    from wavenb.run import SHARED
    r = run_cli('train', 'diffusion', '--help')
    assert r.returncode == 0, r.stderr[-2000:]
    h = ' '.join(r.stdout.split())                                             # argparse wraps long lines
    for o in ('data', 'split', 'size', 'steps', 'minutes', 'batch_size', 'lr', 'warmup', 'ema', 'ckpt', 'ckpt_every', 'out', 'device', 'seed'):
        assert f"--{o.replace('_', '-')} " in h and SHARED[o] in h, o
    for o in ('--compile', '--no-band-scaling', '--match-unet', '--mix-levels', '--fid-every', '--sample-steps', '{pixel,wavelet}', '{eps,x0,v}'):
        assert o in h, o
    assert '--fid-net' not in h and '--max-minutes' not in h
    from wavenb.cli import build_parser
    p = build_parser()
    a = p.parse_args(['sample', 'diffusion', '--sample-steps', '7', '--grid', 'g.png'])
    assert (a.sample_steps, a.grid, a.ckpt) == (7, 'g.png', 'runs/diffusion')
    a = p.parse_args(['bench', 'diffusion', '--timed-steps', '2', '--untimed-steps', '0', '--configs', 'pixel-ddpm', '--batch-sizes', '8', '16'])
    assert (a.timed_steps, a.untimed_steps, a.configs, a.batch_sizes, a.skip_missing) == (2, 0, ['pixel-ddpm'], [8, 16], True)
    for old in (['sample', 'diffusion', '--steps', '7'], ['sample', 'diffusion', '--out', 'g.png'], ['bench', 'diffusion', '--warmup', '1']):
        with pytest.raises(SystemExit): p.parse_args(old)

def test_no_ema(tmp_path, one_thread):
    "`ema=0` means no EMA: training, evaluation and the folder's model use the raw weights."
    from wavenb.diffusion import train_diffusion, load_diffusion
    from wavenb.learner import load_run
    from wavenb.metrics import RandomFeatures
    m = train_diffusion('sample', steps=2, batch_size=8, width=16, blocks=1, warmup=1, sample_steps=2, ema=0, eval_samples=4,
                        fid_net=RandomFeatures(), ckpt=tmp_path / 'ck', out=tmp_path / 'res', device='cpu')
    assert m['fid_sampler'] == 'DDIM 2 steps, raw weights, fp32' and math.isfinite(m['fid'])
    ck = load_run(tmp_path / 'ck')[1]
    assert 'EMACB' not in ck['callbacks']
    model = load_diffusion(tmp_path / 'ck')[2]
    assert all(torch.equal(v, ck['model'][k]) for k, v in model.state_dict().items())
