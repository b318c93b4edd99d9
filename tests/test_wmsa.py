"wavenb.wmsa on the CPU: token counts, tokens = DWT coefficients, PE shapes, PSD kernel, K = 0 -> zero weight, overfitting, time budget, EMA, learning on held-out data, CLI."
import json, math
import numpy as np
import pytest, torch
import torch.nn.functional as F
from wavenb.haar import wavedec2
from wavenb.data import ImageSet, Collate, load_images, resize_uint8, to_float
from wavenb.learner import Learner
from conftest import run_cli
from wavenb.wmsa import (token_count, token_bands, WaveletTokenizer, ScaleAwarePE, sinusoidal_2d, WaveletKernel, log_kernel_mask,
                         box_overlap, Attention, WaveletTransformer, ViT, SIZES, n_params, count_flops)

@pytest.mark.parametrize('size,levels,over,pool,patch', [(32, 3, False, None, 1), (32, 3, True, 1, 1), (32, 2, True, None, 1),
                                                         (16, 2, False, 2, 2), (32, 3, True, None, 2), (64, 4, True, 1, 1)])
def test_token_count_formula(size, levels, over, pool, patch):
    n = token_count(size, levels, over, pool, patch)
    J = levels
    closed = (3 * sum(size ** 2 // 4 ** j for j in range(1, J + 1)) + over * sum(size ** 2 // 4 ** j for j in range(1, J))) // patch ** 2 \
        + (size ** 2 // 4 ** J // patch ** 2 if pool is None else pool ** 2)
    assert n == closed
    tk = WaveletTokenizer(size, levels, 'haar', over, pool, patch)
    toks = tk(torch.randn(2, 3, size, size))
    assert len(tk) == n == sum(t.shape[1] for t in toks)
    assert [t.shape[-1] for t in toks] == tk.features
    assert tk.level.shape == tk.orient.shape == (n,) and tk.pos.shape == (n, 2)

def test_token_counts_of_the_two_sets():
    assert token_count(32, 3) == 1024                                   # non-redundant: as many tokens as pixels
    assert token_count(32, 3, overcomplete=True, ll_pool=1) == 1329    # the original: LL_1, LL_2 kept, LL_3 pooled to 1
    with pytest.raises(ValueError, match='divisible'): token_bands(20, 3)
    with pytest.raises(ValueError, match='patch'): token_bands(32, 3, patch=3)

@pytest.mark.parametrize('wavelet', ['haar', 'db4'])
def test_tokens_are_the_wavedec2_coefficients(wavelet):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    toks, ref = WaveletTokenizer(32, 2, wavelet).double()(x), wavedec2(x, wavelet, 2)
    flat = lambda c: c.flatten(2).transpose(1, 2)
    assert torch.allclose(toks[0], flat(ref[0]) / 4)
    for k, c in enumerate([*ref[1], *ref[2]]): assert torch.allclose(toks[1 + k], flat(c))
    over = WaveletTokenizer(32, 2, wavelet, overcomplete=True).double()(x)
    assert torch.allclose(over[4], flat(wavedec2(x, wavelet, 1)[0]) / 2)   # the extra LL_1 band

def test_pe_shapes_and_common_frame():
    tk = WaveletTokenizer(32, 3, overcomplete=True, ll_pool=1)
    pe = ScaleAwarePE(tk.level, tk.orient, tk.pos, 48, 32)
    assert pe().shape == (1329, 48) and pe.scale.weight.shape == (3, 48) and pe.orientation.weight.shape == (4, 48)
    # the same pixel point at two scales has the same spatial code
    a = ((tk.level == 3) & (tk.orient == 1) & (tk.pos == torch.tensor([12., 4.])).all(-1)).nonzero()[0, 0]
    assert torch.equal(pe.spatial[a], sinusoidal_2d(torch.tensor([[12., 4.]]), 48, 32)[0])
    with pytest.raises(ValueError, match='divisible by 4'): sinusoidal_2d(tk.pos, 30, 32)

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_kernel_is_psd_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    tk = WaveletTokenizer(16, 2 + seed % 2, overcomplete=bool(seed % 2), patch=1 + (seed == 2))
    kern = WaveletKernel(3)
    with torch.no_grad():
        kern.theta.copy_(torch.randn(kern.theta.shape, generator=g) * 2); kern.log_length.copy_(torch.randn(3, generator=g))
    radius = float(torch.empty(()).uniform_(1, 4, generator=g))
    K = kern(tk.level, tk.orient, log_kernel_mask(tk.pos, tk.stride, radius)).exp().double().detach()
    for k in K: assert np.linalg.eigvalsh(k.numpy()).min() >= -1e-6
    assert torch.allclose(K.diagonal(dim1=-2, dim2=-1), torch.ones(3, len(tk), dtype=torch.float64), atol=1e-5)
    assert (K == 0).any() and torch.allclose(K, K.mT)
    # random point sets too (not just the token grid): the window-overlap kernel is a Gram matrix
    pos, stride = torch.rand(60, 2, generator=g) * 32, 2.0 ** torch.randint(1, 4, (60,), generator=g).float()
    assert np.linalg.eigvalsh(box_overlap(pos, stride, radius).double().numpy()).min() >= -1e-6

def test_zero_kernel_pairs_get_zero_attention_weight():
    torch.manual_seed(0)
    tk = WaveletTokenizer(16, 2)
    ls = log_kernel_mask(tk.pos, tk.stride, 2.0)
    assert (ls.isinf().sum(1) < len(tk)).all() and (ls.diagonal() == 0).all()        # no row is fully masked
    bias = WaveletKernel(2)(tk.level, tk.orient, ls).detach()
    att = Attention(16, 2).requires_grad_(False)
    x = torch.randn(2, len(tk), 16)
    w = att.weights(x, bias)
    assert (w[:, :, ls.isinf()] == 0).all()
    q, k, v = att._qkv(x)
    qi, ki = ls.isinf().nonzero()[5].tolist()
    v2 = v.clone(); v2[:, :, ki] = 1e3
    out, out2 = (F.scaled_dot_product_attention(q, k, vv, attn_mask=bias) for vv in (v, v2))
    assert torch.equal(out[:, :, qi], out2[:, :, qi])                                 # the masked key cannot influence the query
    assert torch.allclose(out, w @ v, atol=1e-5)

def test_kernel_gradients_are_finite():
    m = WaveletTransformer(size=8, levels=2, dim=16, depth=1, heads=2, radius=1.0)
    assert m.log_spatial.isinf().any()
    m(torch.randn(3, 3, 8, 8)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.kernels[0].theta.grad.abs().sum() > 0

def test_model_overfits_a_tiny_batch():
    s = load_images()
    ds = ImageSet(resize_uint8(s.images[::125][:16], 8), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0)), s.classes, 'tiny')
    torch.manual_seed(0)
    m = WaveletTransformer(size=8, levels=2, dim=32, depth=2, heads=2)
    m.tok.fit_scales(to_float(resize_uint8(s.images[:500], 8), 'symmetric'))
    L = Learner(m, ds, F.cross_entropy, batch_size=16, lr=1e-2, collate=Collate('symmetric'), weight_decay=0.0)
    L.fit(80)
    assert L.history['loss'][0] > 2.0 and L.history['loss'][-1] < 0.25

def test_sizes_params_and_flops():
    for name, cfg in SIZES.items():
        w, v = n_params(WaveletTransformer(**cfg)), n_params(ViT(**cfg))
        assert abs(w - v) / v < 0.02
    d, N = 96, 1024
    f = count_flops(WaveletTransformer(**SIZES['tiny']), (3, 32, 32))
    assert abs(f - 4 * (24 * N * d * d + 4 * N * N * d)) / f < 0.02

def _tiny(tmp_path, **kw):
    "A tiny W-MSA run of `train_classifier` on the embedded sample (8x8 images, 64 tokens, 1,600 training and 400 held-out images)."
    from wavenb.wmsa import train_classifier
    cfg = dict(data='sample', size=8, levels=2, dim=32, depth=1, heads=2, batch_size=64, valid_size=400, lr=3e-3, warmup=10,
               policy='none', drop_path=0.0, eval_every=10 ** 6, ckpt_every=10 ** 6, ckpt=tmp_path / 'ck', out=tmp_path / 'res')
    return train_classifier('wmsa', **{**cfg, **kw})

def test_time_budget_schedule_is_smooth(tmp_path, monkeypatch):
    "`--minutes`: warmup, then a cosine over the training time, ending at the budget; the LR never jumps by more than one warmup step."
    import types, wavenb.learner as Lmod, wavenb.wmsa as W
    from wavenb.learner import load_run
    clock = iter(range(10 ** 7))                 # one fake clock for every timer of the run: each reading advances 1/64 s,
    fake = lambda: next(clock) / 64              # so each training step takes 1/64 s and the 2-second budget holds 128 steps
    for mod in (Lmod, W): monkeypatch.setattr(mod, 'time', types.SimpleNamespace(time=fake, perf_counter=fake))
    _tiny(tmp_path, dim=16, warmup=5, lr=1e-3, steps=10 ** 4, minutes=2 / 60)
    cfg, ck, _ = load_run(tmp_path / 'ck')
    lr = ck['history']['lr']
    slope = lr[1] - lr[0]                                                        # the warmup slope
    assert max(abs(b - a) for a, b in zip(lr, lr[1:])) <= slope * 1.001          # no jump anywhere
    assert slope == pytest.approx(1e-3 / 5) and max(lr) == pytest.approx(1e-3)   # 5 warmup steps to the peak
    assert 128 <= ck['step'] <= 129 and len(lr) == ck['step']                    # stopped by the time budget, not by the step cap
    assert lr[-1] < 0.01 * max(lr)                                               # the cosine ends with the budget
    with pytest.raises(ValueError, match='number of steps'): W.train_classifier('wmsa', warmup=0.05, ckpt=tmp_path / 'x')
    assert not (tmp_path / 'x').exists()                                        # a refused option leaves no configuration behind

def test_ema_copies_buffers_and_gives_finite_metrics(tmp_path, monkeypatch):
    "With --ema the evaluated (EMA) model holds the model's buffers (the kernel's -inf mask, token levels, band scales) and its metrics are finite."
    import wavenb.wmsa as W
    from wavenb.learner import load_run
    evaluated, count_flops = [], W.count_flops
    monkeypatch.setattr(W, 'count_flops', lambda model, *a, **k: evaluated.append(model) or count_flops(model, *a, **k))  # sees the model reported on
    m = _tiny(tmp_path, ema=0.999, steps=5, test_data='sample')
    assert m['weights'] == 'EMA' and all(math.isfinite(m[k]) for k in ('valid_loss', 'test_loss'))
    cfg, ck, _ = load_run(tmp_path / 'ck')
    ema, fresh = dict(evaluated[0].named_buffers()), W.build_classifier(cfg)
    assert fresh.log_spatial.isinf().any() and 'tok.scales' in ck['model']
    for k, b in fresh.named_buffers():             # constant buffers as built, fitted ones (tok.scales) as trained
        assert torch.equal(ema[k], ck['model'][k] if k in ck['model'] else b), k
    assert all(torch.isfinite(p).all() for p in evaluated[0].parameters())

def test_short_run_beats_chance_on_held_out_data(tmp_path):
    "300 steps (12 epochs of 1,600 images) reach about 25% on the 400 held-out images (3 seeds: 24.8, 25.0, 26.5%); chance is 10% and no constant prediction beats the held-out majority class (12%)."
    from wavenb.data import load_images
    m = _tiny(tmp_path, steps=300)
    ds = load_images('sample')
    valid = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:400]   # train_classifier's fixed split
    majority = ds.labels[valid].bincount().max().item() / 400
    saved = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert saved['valid']['sha256'] == load_images('sample', size=8).subset(valid).checksum   # validated on exactly those images
    assert saved['dataset']['images'] == 1600 and saved['config']['valid_size'] == 400
    assert majority < 0.13 and m['valid_acc'] > majority + 0.08
    assert m['valid_loss'] < math.log(10) - 0.15            # uniform predictions give log 10 (label smoothing included)

def test_cli_train_resume_eval(tmp_path, capsys):
    from wavenb.cli import main
    from wavenb.data import pack_subset, sample_path
    small = pack_subset(sample_path(), tmp_path / 'small.npz', per_class=20)       # 200 images: quick on 2 shared cores
    args = ['train', 'wmsa', '--data', str(small), '--size', '16', '--levels', '2', '--dim', '16', '--depth', '1', '--heads', '2',
            '--batch-size', '16', '--valid-size', '50', '--eval-every', '4', '--ckpt', str(tmp_path / 'ck'), '--out', str(tmp_path / 'res'),
            '--test-data', str(small)]
    assert main(args + ['--steps', '4']) == 0
    assert main(args + ['--steps', '6']) == 0 and 'resumed from' in capsys.readouterr().out   # extends the same run
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['steps'] == 6 and m['config']['kind'] == 'wmsa' and m['metrics']['tokens'] == 256
    assert m['metrics']['test_data']['images'] == 200 and m['metrics']['flops_per_image'] > 0 and (tmp_path / 'res' / 'attention.png').is_file()
    assert m['config']['model_size'] == 'tiny' and m['config']['size'] == 16 and m['config']['image_size'] == 16
    assert main(['eval', 'wmsa', '--ckpt', str(tmp_path / 'ck'), '--test-data', str(small), '--device', 'cpu']) == 2   # 32x32 data, 16x16 model
    assert 'the model takes' in capsys.readouterr().err
    assert main(['eval', 'wmsa', '--ckpt', str(tmp_path / 'ck'), '--test-data', str(small), '--size', '16', '--device', 'cpu',
                 '--out', str(tmp_path / 'ev')]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r['images'] == 200 and r['kind'] == 'wmsa' and r['acc'] == pytest.approx(m['metrics']['test_acc'], abs=0.011)
    assert json.loads((tmp_path / 'ev' / 'metrics.json').read_text())['metrics'] == r
    assert main(['eval', 'wmsa', '--ckpt', str(tmp_path / 'ck')]) == 2 and '--test-data' in capsys.readouterr().err
    assert main(['eval', 'vit', '--ckpt', str(tmp_path / 'ck'), '--test-data', str(small)]) == 2
    assert 'wavenb eval wmsa' in capsys.readouterr().err
    assert main(['eval', 'wmsa', '--ckpt', str(tmp_path / 'nothing'), '--test-data', str(small)]) == 2
    assert 'config.json' in capsys.readouterr().err
    assert main(args + ['--steps', '6', '--radius', '2']) == 2 and 'another configuration' in capsys.readouterr().err
    assert main(['train', 'vit', '--data', str(small), '--size', '16', '--vit-patch', '4', '--dim', '16', '--depth', '1', '--heads', '2',
                 '--batch-size', '16', '--valid-size', '50', '--steps', '3', '--ckpt', str(tmp_path / 'v'), '--out', str(tmp_path / 'vres')]) == 0
    v = json.loads((tmp_path / 'vres' / 'metrics.json').read_text())
    assert v['config']['kind'] == 'vit' and v['metrics']['tokens'] == 16 and abs(v['parameters'] - m['parameters']) / m['parameters'] < 0.2

def test_compare_vit(tmp_path, capsys):
    "`compare_vit`: the W-MSA run, then the ViT with the same options in CKPT/vit and OUT/vit, and the table of both in OUT/compare.md."
    m = _tiny(tmp_path, steps=2, vit_patch=2, compare_vit=True)
    w, v = (json.loads((tmp_path / 'res' / p / 'metrics.json').read_text()) for p in ('', 'vit'))
    assert m['tokens'] == w['metrics']['tokens'] == 64 and v['metrics']['tokens'] == (8 // 2) ** 2
    assert (w['config']['kind'], v['config']['kind']) == ('wmsa', 'vit') and v['steps'] == w['steps'] == 2
    assert {k: v['config'][k] for k in ('lr', 'batch_size', 'valid_size', 'image_size')} == {k: w['config'][k] for k in ('lr', 'batch_size', 'valid_size', 'image_size')}
    assert v['valid']['sha256'] == w['valid']['sha256']                              # the same validation images
    assert (tmp_path / 'ck' / 'vit' / 'config.json').is_file()
    table = (tmp_path / 'res' / 'compare.md').read_text()
    assert '| res | W-MSA tiny, haar J=2 | 64 |' in table and '| vit | ViT tiny, patch 2 | 16 |' in table and table in capsys.readouterr().out
    from wavenb.wmsa import train_classifier
    with pytest.raises(ValueError, match='wavenb train wmsa'): train_classifier('vit', compare_vit=True, ckpt=tmp_path / 'v')

@pytest.mark.parametrize('cmd', ['wmsa', 'vit'])
def test_cli_help_lists_the_shared_options(cmd):
    "Through the installed console script: the shared options, the model size apart from the image size, the wavelet options only for W-MSA."
    import re
    options = lambda text: set(re.findall(r'(?<![\w-])--[a-z][\w-]*', text.split('\n\n')[0]))   # the usage lines
    h = run_cli('train', cmd, '--help')
    assert h.returncode == 0, h.stderr
    shared = {'--data', '--split', '--test-data', '--size', '--steps', '--minutes', '--batch-size', '--lr', '--warmup', '--ema', '--ckpt',
              '--ckpt-every', '--out', '--device', '--seed', '--compile', '--workers'}
    opts = options(h.stdout)
    assert shared | {'--model-size', '--valid-size', '--vit-patch'} <= opts, shared - opts
    assert '--model-size {tiny,small,base}' in h.stdout and not {'--resize', '--test'} & opts
    assert f'(default: runs/{cmd})' in ' '.join(h.stdout.split())
    assert ({'--levels', '--no-kernel', '--compare-vit'} <= opts) == (cmd == 'wmsa') and ('--levels' in opts) == (cmd == 'wmsa')
    e = run_cli('eval', cmd, '--help')
    assert e.returncode == 0 and options(e.stdout) == {'--ckpt', '--test-data', '--size', '--batch-size', '--device', '--out'}, e.stdout

def test_augmentation_and_mixing():
    from wavenb.wmsa import AugCollate, MixCB, _ce
    s = load_images(limit=8)
    x, y = AugCollate('randaug')(list(zip(s.images, s.labels)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    with pytest.raises(ValueError, match='policy'): AugCollate('autoaugment')
    cb = MixCB(10, p=1.0); cb.learn = type('L', (), {})(); cb.learn.batch = (x, y)
    cb.before_batch()
    xm, ym = cb.learn.batch
    assert xm.shape == x.shape and ym.shape == (8, 10) and torch.allclose(ym.sum(1), torch.ones(8))
    assert torch.isfinite(_ce(0.1)(torch.randn(8, 10), ym)) and torch.isfinite(_ce(0.1)(torch.randn(8, 10), y))
