"wavenb.haar against PyWavelets, on shapes and settings the notebook does not try."
import warnings
import numpy as np, pytest, pywt, torch
from wavenb.haar import (dwt2, idwt2, wavedec2, waverec2, dwt2_stacked, idwt2_stacked, analysis_matrix,
                         DWT2, IDWT2, WaveDec2, WaveRec2, max_level, band_energy, coeffs_to_image)

WAVELETS = ['haar', 'db2', 'db4', 'sym4', 'coif2', 'db1', 'sym2', 'coif1']

def pywt_dec(x, w, level):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return pywt.wavedec2(x, w, mode='periodization', level=level)

@pytest.mark.parametrize('w', WAVELETS)
@pytest.mark.parametrize('shape,level', [((32, 32), 1), ((3, 32, 32), 3), ((2, 1, 16, 48), 4), ((2, 2, 12, 20), 2), ((4, 8), 2)])
def test_matches_pywt(w, shape, level):
    x = np.random.default_rng(1).standard_normal(shape)
    ours, ref = wavedec2(torch.tensor(x, dtype=torch.float32), w, level), pywt_dec(x, w, level)
    assert len(ours) == len(ref) == level + 1
    np.testing.assert_allclose(ours[0].numpy(), ref[0], atol=1e-5)
    for od, rd in zip(ours[1:], ref[1:]):
        for o, r in zip(od, rd): np.testing.assert_allclose(o.numpy(), r, atol=1e-5)
    rec = waverec2(ours, w)
    assert (rec - torch.tensor(x, dtype=torch.float32)).abs().max() < 1e-5
    np.testing.assert_allclose(waverec2([torch.tensor(ref[0])] + [tuple(map(torch.tensor, d)) for d in ref[1:]], w).numpy(), x, atol=1e-9)

@pytest.mark.parametrize('w', WAVELETS)
def test_orthogonal_and_parseval(w):
    for n in (2, 6, 10, 64):
        W = analysis_matrix(n, w)
        assert torch.allclose(W @ W.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(5, 3, 16, 24, dtype=torch.float64)
    c = wavedec2(x, w, 3)
    energy = c[0].pow(2).sum() + sum(t.pow(2).sum() for d in c[1:] for t in d)
    assert torch.allclose(energy, x.pow(2).sum(), rtol=1e-10)

def test_stacked_layout_is_pywt_order():
    x = torch.randn(2, 3, 8, 8)
    y = DWT2('db2')(x)
    assert y.shape == (2, 3, 4, 4, 4)
    cA, (cH, cV, cD) = dwt2(x, 'db2')
    for k, t in enumerate((cA, cH, cV, cD)): assert torch.equal(y[:, :, k], t)
    assert torch.allclose(IDWT2('db2')(y), x, atol=1e-5)
    assert torch.allclose(WaveRec2('coif2')(WaveDec2('coif2', 2)(x)), x, atol=1e-5)

def test_haar_fast_path_equals_matrix_path():
    from wavenb.haar import _haar_fwd
    x = torch.randn(3, 2, 16, 8, dtype=torch.float64)
    Y = analysis_matrix(16) @ x @ analysis_matrix(8).T
    ref = torch.stack([Y[..., :8, :4], Y[..., 8:, :4], Y[..., :8, 4:], Y[..., 8:, 4:]], -3)
    assert torch.allclose(_haar_fwd(x), ref, atol=1e-12)

@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize('w', ['haar', 'db4'])
def test_dtypes(dtype, tol, w):
    x = torch.rand(2, 3, 32, 32).to(dtype)
    c = wavedec2(x, w, 3)
    assert all(t.dtype == dtype for t in [c[0], *[b for d in c[1:] for b in d]])
    assert (waverec2(c, w).double() - x.double()).abs().max() < tol

@pytest.mark.parametrize('w', ['haar', 'db2', 'coif2'])
def test_gradcheck(w):
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dwt2_stacked(t, w), (x,))
    assert torch.autograd.gradcheck(lambda t: waverec2(wavedec2(t, w, 2), w), (x,))
    y = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: idwt2_stacked(t, w), (y,))

@pytest.mark.parametrize('call,match', [
    (lambda: dwt2(torch.zeros(3, 9, 8)), r'level 1 of 1.*\(3, 9, 8\)'),
    (lambda: wavedec2(torch.zeros(2, 3, 24, 24), level=4), r'level 4 of 4.*\(2, 3, 24, 24\).*3x3.*at most 3'),
    (lambda: wavedec2(torch.zeros(16, 16), level=5), r'level 5 of 5.*1x1'),
    (lambda: wavedec2(torch.zeros(16, 16), level=0), r'level must be an integer >= 1'),
    (lambda: dwt2(torch.zeros(16)), r'\(\.\.\., H, W\).*\(16,\)'),
    (lambda: dwt2(torch.zeros(4, 4), 'nonsense'), r"unknown wavelet 'nonsense'"),
    (lambda: dwt2(torch.zeros(4, 4), 'bior2.2'), r'not orthogonal'),
    (lambda: idwt2_stacked(torch.zeros(3, 3, 4, 4)), r'\(\.\.\., 4, h, w\)'),
    (lambda: waverec2([torch.zeros(2, 2), (torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(4, 4))]), r'one shape'),
    (lambda: waverec2([torch.zeros(2, 2)]), r'at least one level'),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match): call()

def test_type_errors():
    with pytest.raises(TypeError, match='floating-point'): dwt2(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match='torch.Tensor'): dwt2(np.zeros((4, 4)))

def test_helpers():
    assert [max_level(h, w) for h, w in [(32, 32), (64, 48), (28, 28), (7, 8)]] == [5, 4, 2, 0]
    x = torch.randn(1, 16, 16)
    c = wavedec2(x, 'haar', 2)
    assert coeffs_to_image(c).shape == x.shape
    e = band_energy(c)
    assert list(e) == ['LL2', 'LH2', 'HL2', 'HH2', 'LH1', 'HL1', 'HH1'] and abs(sum(e.values()) - 1) < 1e-9

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('w', ['haar', 'db4'])
def test_cuda_matches_cpu(w):
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(dwt2_stacked(x.cuda(), w).cpu(), dwt2_stacked(x, w), atol=1e-4)

def test_approximately_orthogonal_wavelets_are_refused():
    "dmey passes PyWavelets' `orthogonal` flag but its truncated filters are not orthonormal: the transpose would not invert it."
    with pytest.raises(ValueError, match='only approximately orthogonal'): dwt2(torch.randn(1, 64, 64), 'dmey')

def test_pywt_wavelet_objects_and_none_bands():
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    for w in ('haar', 'db2', 'sym4'):
        torch.testing.assert_close(dwt2_stacked(x, pywt.Wavelet(w)), dwt2_stacked(x, w))
    custom = pywt.Wavelet('mine', filter_bank=pywt.Wavelet('db2').filter_bank[::-1])
    with pytest.raises(TypeError, match='own filter bank'): dwt2(x, custom)
    with pytest.raises(TypeError, match='wavelet must be a name'): dwt2(x, 3)
    cA, (cH, cV, cD) = dwt2(x, 'db2')
    for coeffs in [(cA, (None, None, None)), (None, (cH, None, cD))]:   # None is a zero band, as in PyWavelets
        ref = pywt.idwt2(tuple(None if t is None else (t.numpy() if not isinstance(t, tuple) else tuple(None if u is None else u.numpy() for u in t)) for t in coeffs),
                         'db2', mode='periodization')
        np.testing.assert_allclose(idwt2(coeffs, 'db2').numpy(), ref, atol=1e-10)
    with pytest.raises(ValueError, match='all four bands are None'): idwt2((None, (None, None, None)))
