"wavenb.metrics: FID/KID against an independent formula, caching, the real network when it is here."
import json, math, os
import pytest, torch
from wavenb.data import load_images
from wavenb.metrics import (FIDKID, RandomFeatures, InceptionFeatures, fid_between, fid_weights_path, psnr, ssim,
                            bits_per_dim, write_metrics, dataset_info)

SHARED_FID = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'models', 'fid-inception-fp16.pt')

def fid_formula(f1, f2):
    "FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the trace of the root from the eigenvalues of S1 S2."
    f1, f2 = f1.double(), f2.double()
    m1, m2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    ev = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    return ((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * ev

def test_fid_matches_the_formula():
    ds = load_images()
    a, b = ds.subset(range(0, 600)), ds.subset(range(600, 1400))
    net = RandomFeatures(32)
    m = FIDKID(net, kid_subset_size=100).set_real(a)
    res = m.add_fake(b.images).compute()
    expect = fid_formula(net(a.images), net(b.images)).item()
    assert abs(res['fid'] - expect) < 1e-3 * max(1, expect)
    assert res['n_real'] == 600 and res['n_fake'] == 800

def test_fake_side_is_reset_between_evaluations():
    ds = load_images()
    m = FIDKID(RandomFeatures(), kid_subset_size=100).set_real(ds.subset(range(1000)))
    good = m.reset_fake().add_fake(ds.images[1000:1500]).compute()['fid']
    bad = m.reset_fake().add_fake(torch.zeros(500, 3, 32, 32, dtype=torch.uint8)).compute()['fid']
    again = m.reset_fake().add_fake(ds.images[1000:1500]).compute()['fid']
    assert bad > 10 * good and abs(again - good) < 1e-9

def test_fid_between_cached_equals_uncached():
    ds = load_images()
    a, b = ds.subset(range(0, 2000, 2)), ds.subset(range(1, 2000, 2))
    r1 = fid_between(a, b, RandomFeatures(), cache=False)
    r2 = fid_between(a, b, RandomFeatures())
    r3 = fid_between(a, b, RandomFeatures())   # now both from the cache
    assert abs(r1['fid'] - r2['fid']) < 1e-6 and abs(r2['fid'] - r3['fid']) < 1e-9
    assert abs(r1['kid'] - r2['kid']) < 1e-6

def test_weights_resolution(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='WAVENB_FID_WEIGHTS'): fid_weights_path(tmp_path / 'none.pt')
    monkeypatch.setenv('WAVENB_FID_WEIGHTS', str(tmp_path / 'none.pt'))
    with pytest.raises(FileNotFoundError, match='none.pt'): fid_weights_path()
    (tmp_path / 'f.pt').write_bytes(b'x')
    assert fid_weights_path(tmp_path / 'f.pt') == tmp_path / 'f.pt'
    with pytest.raises(ValueError, match='cannot load the FID network'): InceptionFeatures(tmp_path / 'f.pt')

@pytest.mark.skipif(not os.path.isfile(SHARED_FID), reason='the FID Inception network is not beside this checkout')
def test_real_inception_network_on_a_few_images():
    net = InceptionFeatures(SHARED_FID)
    imgs = load_images().images[:4]
    f = net(imgs)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool3 after ReLU
    assert torch.allclose(net(imgs.float() / 255), f, atol=1e-4)  # uint8 and [0, 1] inputs agree
    assert torch.allclose(net(imgs[:1].float().mean(1, keepdim=True) / 255), net(imgs[:1].float().mean(1, keepdim=True).expand(-1, 3, -1, -1) / 255), atol=1e-4)

def test_psnr_ssim_bpd():
    x = torch.rand(4, 3, 16, 16)
    y = (x + 0.1).clamp(0, 1)
    mse = ((x - y) ** 2).mean((1, 2, 3))
    assert torch.allclose(psnr(x, y), 10 * torch.log10(1 / mse), atol=1e-4)
    assert (ssim(x, y) < 1).all()
    assert abs(float(bits_per_dim(100 * math.log(2), 100)) - 1) < 1e-12
    with pytest.raises(ValueError, match='shapes differ'): ssim(x, y[:2])
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): psnr(x[0], y[0])

def test_write_metrics(tmp_path):
    ds = load_images(limit=10)
    p = write_metrics(tmp_path / 'exp', {'psnr': 30.0}, dataset=dataset_info(ds))
    d = json.loads(p.read_text())
    assert p.name == 'metrics.json' and d['metrics'] == {'psnr': 30.0} and d['dataset']['images'] == 10
    assert d['git_commit'] is None or len(d['git_commit']) == 40
