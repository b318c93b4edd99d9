"wavenb.ar on the CPU: causality, the full model is trained (T inputs for T targets), KV-cache sampling, top-k/top-p, NLL in bits, CLI."
import json, math
import pytest, torch
from torch import nn
from wavenb.ar import (CodePrior, prior_loss, sample_codes, filter_logits, prior_nll, codes_to_seq, seq_to_codes, CodeSet,
                       collate_codes, load_ar)

SHAPES, K = [(2, 2), (2, 2), (3, 3)], 6
pytestmark = pytest.mark.usefixtures('one_thread')      # tiny models: one thread is many times faster on a busy CPU

def small(layers=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return CodePrior(SHAPES, K, d=32, layers=layers, heads=4).to(dtype).eval()

def test_causal_every_position():
    prior = small()
    seq = torch.randint(0, K, (3, prior.T))
    base = prior(seq)
    assert base.shape == (3, prior.T, K)                        # T predictions from T inputs
    for t in range(prior.T):
        s2 = seq.clone(); s2[:, t] = (s2[:, t] + 1) % K
        out = prior(s2)
        assert torch.equal(out[:, :t + 1], base[:, :t + 1]), f'changing code {t} changed the logits at or before {t}'
        if t + 1 < prior.T: assert not torch.allclose(out[:, t + 1], base[:, t + 1]), f'code {t} does not reach position {t + 1}'

def test_first_code_is_predicted_from_start_only():
    prior = small()
    seq = torch.randint(0, K, (4, prior.T))
    l0 = prior(seq)[:, 0]
    assert torch.allclose(l0, l0[:1].expand_as(l0))             # c_0 sees only START: the same distribution for every sequence

def test_every_parameter_of_the_full_model_gets_gradient():
    prior = small(layers=4, dtype=torch.float32).train()
    seq = torch.randint(0, K, (8, prior.T))
    prior_loss(prior(seq), seq).backward()
    missing = [n for n, p in prior.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == [], missing
    assert prior.tok.weight.grad[prior.start].abs().sum() > 0 and len(prior.blocks) == 4

def test_learner_trains_the_full_model_on_structured_codes():
    "Codes c_t = c_0 + t (mod K): only c_0 is random, so a model that uses its context gets far below log2 K bits."
    from wavenb.learner import Learner, LRScheduleCB
    torch.manual_seed(0)
    prior = CodePrior(SHAPES, K, d=32, layers=2, heads=4)
    T = prior.T
    seqs = (torch.randint(0, K, (512, 1)) + torch.arange(T)) % K
    before = {n: p.detach().clone() for n, p in prior.named_parameters()}
    L = Learner(prior, CodeSet(seqs.to(torch.int16)), prior_loss, batch_size=32, lr=3e-3, collate=collate_codes, cbs=[LRScheduleCB(5)])
    L.fit(120)
    assert L.raw_model is prior
    assert [n for n, p in prior.named_parameters() if torch.equal(p, before[n])] == []
    r = prior_nll(prior, seqs[:64], 3 * 8 * 8)
    assert r['bits_per_code'] < 0.35 * math.log2(K), r                  # c_0 alone costs log2(K) / T per code
    assert r['bits_per_code_band'][0] > r['bits_per_code_band'][2]      # the first band holds the one random code

@pytest.mark.parametrize('kw', [dict(temperature=0.8, top_k=3), dict(top_p=0.7), dict(temperature=0)])
def test_kv_cache_sampling_equals_recomputation(kw):
    prior = small()
    a = sample_codes(prior, 5, use_cache=True, generator=torch.Generator().manual_seed(3), **kw)
    b = sample_codes(prior, 5, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == (5, prior.T) and torch.equal(a, b) and a.max() < K
    c = sample_codes(prior, 5, use_cache=True, generator=torch.Generator().manual_seed(4), **kw)
    if kw.get('temperature') != 0: assert not torch.equal(a, c)

def test_cached_logits_equal_teacher_forced():
    prior = small()
    seq = torch.randint(0, K, (2, prior.T))
    caches = [{} for _ in prior.blocks]
    inp = torch.cat([torch.full((2, 1), prior.start), prior.tokens(seq)[:, :-1]], 1)
    steps = torch.cat([prior.run(inp[:, t:t + 1], t, caches) for t in range(prior.T)], 1)
    assert torch.allclose(steps, prior(seq), atol=1e-10)
    with pytest.raises(ValueError, match='one token'): prior.run(inp[:, :2], 0, caches)

def test_filter_logits():
    l = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    assert filter_logits(l, top_k=1).isinf().tolist() == [[False, True, True, True]]
    p = l.softmax(-1)[0]
    for tp in (0.5, float(p[0]) + 0.01, float(p[:2].sum()) + 0.01, 0.9999):
        kept = (~filter_logits(l, top_p=tp).isinf()).sum().item()
        assert p[:kept].sum() >= tp and (kept == 1 or p[:kept - 1].sum() < tp)   # the smallest set reaching tp
    assert torch.allclose(filter_logits(l, 0.5), l * 2)
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0)):
        with pytest.raises(ValueError): filter_logits(l, **bad)

def test_nll_bits():
    prior = small(dtype=torch.float32)
    for h in prior.heads: nn.init.zeros_(h.weight); nn.init.zeros_(h.bias)
    r = prior_nll(prior, torch.randint(0, K, (7, prior.T)), pixels=64)
    assert abs(r['bits_per_code'] - math.log2(K)) < 1e-5 and abs(r['code_bits_per_pixel'] - math.log2(K) * prior.T / 64) < 1e-6
    assert not any('dim' in k for k in r), r.keys()      # a lossy code length: nothing that reads like an image likelihood (bits/dim)
    assert all(abs(b - math.log2(K)) < 1e-5 for b in r['bits_per_code_band'])

def test_sequence_layout_and_errors():
    codes = [torch.randint(0, K, (2, h, w)) for h, w in SHAPES]
    seq = codes_to_seq(codes)
    assert seq.shape == (2, 17) and torch.equal(seq[:, :4], codes[0].flatten(1))
    assert all(torch.equal(a, b) for a, b in zip(seq_to_codes(seq, SHAPES), codes))
    with pytest.raises(ValueError, match='does not fit'): seq_to_codes(seq[:, :-1], SHAPES)
    prior = small()
    with pytest.raises(ValueError, match=r'\(B, 17\)'): prior(seq[:, :-1])
    with pytest.raises(ValueError, match='divisible'): CodePrior(SHAPES, K, d=30, heads=4)

@pytest.fixture(scope='module')
def vq_folder(tmp_path_factory):
    "A tiny VQ-VAE (2x2 codes per band, T=16) trained for two steps, holding out 32 images drawn with seed 1."
    from wavenb.vqvae import train_vqvae
    d = tmp_path_factory.mktemp('vq')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv('WAVENB_CACHE', str(tmp_path_factory.getbasetemp() / 'cache'))
            train_vqvae('sample', steps=2, batch_size=8, K=16, D=4, width=8, n_res=1, down=3, ckpt=d / 'vq', out=d / 'vqres',
                        warmup=1, holdout=32, device='cpu', seed=1)
    finally: torch.set_num_threads(n)
    return d

ONE = {'OMP_NUM_THREADS': '1'}
TINY = dict(d=16, layers=2, heads=2, batch_size=8, warmup=1, throughput_n=2, device='cpu')

def test_prior_trains_and_tests_on_the_vqvae_split(vq_folder, tmp_path):
    "The prior's test images are the VQ-VAE's held-out images (its split is read from its config.json), whatever the prior's seed."
    from wavenb.ar import train_ar
    vres = json.loads((vq_folder / 'vqres' / 'metrics.json').read_text())
    m = train_ar(vq_folder / 'vq', 'sample', steps=2, ckpt=tmp_path / 'ar', out=tmp_path / 'res', seed=0, **TINY)
    assert m['test_set'] == vres['metrics']['test_set'] and m['test_set']['images'] == 32
    cfg = json.loads((tmp_path / 'ar' / 'config.json').read_text())
    assert cfg['data_sha256'] == vres['config']['data_sha256'] and cfg['test_sha256'] == vres['config']['test_sha256']

@pytest.mark.parametrize('kw', [dict(holdout=48), dict(test_data='sample')])
def test_prior_refuses_other_images(vq_folder, tmp_path, kw):
    "Another held-out split, or the whole set with the VQ-VAE's training images as test images: a clear error naming both image sets."
    from wavenb.ar import train_ar
    vcfg = json.loads((vq_folder / 'vq' / 'config.json').read_text())
    with pytest.raises(ValueError, match="training images are not the VQ-VAE's") as e:
        train_ar(vq_folder / 'vq', 'sample', steps=2, ckpt=tmp_path / 'ar', out=tmp_path / 'res', **TINY, **kw)
    msg = str(e.value)
    assert vcfg['data_sha256'][:12] in msg and repr(vcfg['data']) in msg and msg.count('sha256') == 2, msg
    assert not (tmp_path / 'ar').exists()                 # refused before anything was written

def test_prior_refuses_a_test_set_of_training_images(vq_folder):
    from wavenb.ar import check_vqvae_images, vqvae_data
    vcfg = json.loads((vq_folder / 'vq' / 'config.json').read_text())
    train, test = vqvae_data(vq_folder / 'vq', vcfg)
    assert (train.checksum, test.checksum) == (vcfg['data_sha256'], vcfg['test_sha256'])
    with pytest.raises(ValueError, match="test images are not the VQ-VAE's"): check_vqvae_images(vcfg, train, train.subset(range(32)))

def test_old_vqvae_folder_without_test_checksum_warns(vq_folder, tmp_path):
    "A VQ-VAE folder from before the split was recorded: the training images are still checked, the test images only with a warning."
    import shutil
    from wavenb.ar import vqvae_data
    shutil.copytree(vq_folder / 'vq', tmp_path / 'old')
    f = tmp_path / 'old' / 'config.json'
    vcfg = {k: v for k, v in json.loads(f.read_text()).items() if k not in ('size', 'holdout', 'split_seed', 'test', 'test_sha256')}
    with pytest.warns(UserWarning, match='records no checksum of its test images'):
        train, test = vqvae_data(tmp_path / 'old', vcfg, holdout=32, seed=1)
    assert train.checksum == vcfg['data_sha256']
    with pytest.raises(ValueError, match="training images are not the VQ-VAE's"):                 # checked before the test images
        vqvae_data(tmp_path / 'old', vcfg, holdout=32, seed=0)

def test_ema_prior_keeps_integer_buffers_and_reports_its_own_nll(vq_folder, tmp_path):
    "After 40+ EMA updates the EMA prior's band index is the model's, and train_ar's NLL is that of the EMA weights reloaded by load_ar."
    from wavenb.learner import Learner, EMACB
    from wavenb.ar import train_ar, encode_images
    from wavenb.vqvae import load_vqvae
    from wavenb.run import holdout_split
    from wavenb.data import load_images
    torch.manual_seed(0)
    prior = CodePrior([(2, 2)] * 4, K, d=16, layers=1, heads=2)          # four bands: band_of holds 0..3
    seqs = torch.randint(0, K, (64, prior.T))
    L = Learner(prior, CodeSet(seqs), prior_loss, batch_size=16, lr=1e-3, collate=collate_codes, cbs=[EMACB(0.999)])
    L.fit(45)
    ema = dict(L.ema_model.named_buffers())
    for n, b in prior.named_buffers():
        if not b.is_floating_point(): assert torch.equal(ema[n], b), (n, ema[n], b)
    m = train_ar(vq_folder / 'vq', 'sample', steps=45, ema=0.999, ckpt=tmp_path / 'ar', out=tmp_path / 'res', holdout=32, seed=1,
                 flip=False, lr=3e-3, **TINY)
    vq, _ = load_vqvae(vq_folder / 'vq')
    test = holdout_split(load_images('sample'), 32, 1)[1]
    assert test.checksum == m['test_set']['sha256']
    reloaded, _ = load_ar(tmp_path / 'ar')
    r = prior_nll(reloaded, encode_images(vq, test.images), 32 * 32)
    assert abs(r['bits_per_code'] - m['bits_per_code']) < 1e-6 * m['bits_per_code'], (r['bits_per_code'], m['bits_per_code'])
    assert [abs(a - b) < 1e-5 for a, b in zip(r['bits_per_code_band'], m['bits_per_code_band'])] == [True] * 4

def test_fid_path_with_random_features(vq_folder, tmp_path):
    "The FID/KID evaluation end to end, with the small random feature network standing in for Inception."
    from wavenb.ar import train_ar
    from wavenb.metrics import RandomFeatures
    net = RandomFeatures(32)
    m = train_ar(vq_folder / 'vq', 'sample', steps=2, eval_samples=24, fid_weights=net, ckpt=tmp_path / 'ar', out=tmp_path / 'res', **TINY)
    for k in ('fid', 'kid', 'kid_std', 'fid_vqvae_reconstructions_of_test'): assert math.isfinite(m[k]), (k, m[k])
    assert m['fid'] > 0 and m['fid_vqvae_reconstructions_of_test'] > 0 and m['kid_std'] >= 0
    assert m['fid_samples'] == 24 and m['fid_feature_net'] == net.ident and m['fid_reference_images'] == 2000 - 32
    cfg = json.loads((tmp_path / 'ar' / 'config.json').read_text())
    assert m['fid_reference_sha256'] == cfg['data_sha256'] and m['fid_sample_and_score_s'] >= 0   # the whole training split

def test_no_ema_prior_is_sampled_and_reloaded_with_its_own_weights(vq_folder, tmp_path):
    "ema=0: no EMA; the report and load_ar use the trained weights; top_k=0 means all codes, as on the command line."
    from wavenb.ar import train_ar, encode_images
    from wavenb.vqvae import load_vqvae
    from wavenb.data import load_images
    from wavenb.run import holdout_split
    m = train_ar(vq_folder / 'vq', 'sample', steps=3, ema=0, top_k=0, ckpt=tmp_path / 'ar', out=tmp_path / 'res', flip=False, **TINY)
    assert m['sampling'] == dict(temperature=1.0, top_k=None, top_p=None, weights='raw'), m['sampling']
    prior, _ = load_ar(tmp_path / 'ar')
    test = holdout_split(load_images('sample'), 32, 1)[1]
    r = prior_nll(prior, encode_images(load_vqvae(vq_folder / 'vq')[0], test.images), 32 * 32)
    assert abs(r['bits_per_code'] - m['bits_per_code']) < 1e-6 * m['bits_per_code'], (r['bits_per_code'], m['bits_per_code'])

def test_cli_train_and_sample(vq_folder, tmp_path):
    from conftest import run_cli
    vq = vq_folder / 'vq'
    r = run_cli('train', 'ar', '--vqvae', vq, '--d', '16', '--layers', '2', '--heads', '2', '--steps', '3', '--batch-size', '8',
                '--warmup', '1', '--throughput-n', '2', '--ckpt', tmp_path / 'ar', '--out', tmp_path / 'res', '--device', 'cpu', env=ONE)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['steps'] == 3 and m['config']['layers'] == 2 and m['metrics']['tokens_per_image'] == 16
    assert 0 < m['metrics']['bits_per_code'] and m['metrics']['throughput']['same_codes_fraction'] == 1.0
    assert m['metrics']['code_bits_per_pixel'] == pytest.approx(m['metrics']['bits_per_image'] / (32 * 32)) and 'bits_per_dim' not in m['metrics']
    assert '"code_bits_per_pixel"' in r.stdout
    assert (tmp_path / 'res' / 'samples.png').is_file()
    prior, cfg = load_ar(tmp_path / 'ar')
    assert len(prior.blocks) == 2 and prior.T == 16
    r = run_cli('sample', 'ar', '--ckpt', tmp_path / 'ar', '--n', '4', '--top-k', '5', '--out', tmp_path / 's', '--device', 'cpu', env=ONE)
    assert r.returncode == 0 and (tmp_path / 's' / 'samples.png').is_file(), r.stderr[-2000:]
    s = json.loads((tmp_path / 's' / 'metrics.json').read_text())
    assert s['metrics']['images'] == 4 and s['metrics']['sampling']['top_k'] == 5 and s['metrics']['vqvae'] == str(vq)
    r = run_cli('train', 'ar', '--vqvae', vq, '--d', '16', '--layers', '2', '--heads', '2', '--steps', '3', '--holdout', '50',
                '--ckpt', tmp_path / 'ar2', '--out', tmp_path / 'res2', '--device', 'cpu', env=ONE)
    assert r.returncode != 0 and "not the VQ-VAE's" in r.stderr, r.stderr[-2000:]
    with pytest.raises(FileNotFoundError, match='config.json'): load_ar(tmp_path / 'nothing')   # the CLI: one line, exit code 2
    with pytest.raises(ValueError, match='not a train_ar'): load_ar(vq)

@pytest.mark.parametrize('cmd', ['train', 'sample'])
def test_cli_help_lists_the_shared_options(cmd):
    "`wavenb train ar --help` / `wavenb sample ar --help` through the console script: the shared option names, with the shared help."
    from conftest import run_cli
    from wavenb.run import SHARED
    r = run_cli(cmd, 'ar', '--help')
    assert r.returncode == 0, r.stderr[-2000:]
    h = ' '.join(r.stdout.split())                                # argparse wraps long lines
    shared = dict(train=['data', 'split', 'test_data', 'steps', 'minutes', 'batch_size', 'lr', 'warmup', 'ema', 'ckpt', 'ckpt_every',
                         'out', 'device', 'seed', 'compile', 'workers'], sample=['ckpt', 'out', 'device', 'seed'])[cmd]
    for k in shared: assert f'--{k.replace("_", "-")} ' in h and (cmd == 'sample' or SHARED[k] in h), k   # sample's own help for --ckpt etc.
    own = dict(train=['--vqvae', '--holdout', '--no-flip', '--eval-samples', '--throughput-n', '--fid-weights', '--top-k', '--top-p'],
               sample=['--n', '--vqvae', '--no-cache', '--temperature', '--top-k', '--top-p'])[cmd]
    assert all(o + ' ' in h for o in own), [o for o in own if o + ' ' not in h]
    assert '--max-minutes' not in h and '--test-split' not in h
