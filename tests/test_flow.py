"wavenb.flow on the CPU: integer colour transform and lifting, exact invertibility, log-determinants, the prior, training, sampling."
import pytest, torch
from torch import nn
from wavenb.flow import (rct, irct, all_colours, Lift, s_transform, legall53, WaveletFlowTransform, WaveletFlow, max_levels,
                         flow_jacobian, logistic_mixture_logp, logistic_mixture_sample, analysis_filters, save_flow, load_flow,
                         IntCollate, bpd_loss, round_ste, round_half_up, no_round, ll_offset, ll_grid, level_sizes)


pytestmark = pytest.mark.usefixtures('one_thread')

def randomise(m, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * std)
    return m

def test_rct_is_lossless_on_all_colours():
    x = all_colours()
    assert len(torch.unique(x.view(3, -1)[0] * 65536 + x.view(3, -1)[1] * 256 + x.view(3, -1)[2])) == 2 ** 24
    z = rct(x)
    assert torch.equal(irct(z), x)
    assert z[0].min() == 0 and z[0].max() == 255 and z[1:].min() == -255 and z[1:].max() == 255
    with pytest.raises(ValueError, match='3 colour channels'): rct(torch.zeros(1, 2, 4, 4))

def test_lifting_matches_the_textbook_integer_transforms():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-512, 512, (4, 2, 3, 40), generator=g)
    for init, ref in (('haar', s_transform), ('legall', legall53)):
        s, d = Lift(2, init, width=0).double()(x.double())
        rs, rd = ref(x)
        assert torch.equal(s.long(), rs) and torch.equal(d.long(), rd)
    # a hand-computed LeGall case: x = [1, 5, 3, 7]: d = [5 - 2, 7 - 3] = [3, 4], s = [1 + (3+3+2)//4, 3 + (3+4+2)//4] = [3, 5]
    s, d = legall53(torch.tensor([1, 5, 3, 7]))
    assert s.tolist() == [3, 5] and d.tolist() == [3, 4]

@pytest.mark.parametrize('n', [2, 3, 5, 16, 33])
def test_random_nonlinear_lift_is_exactly_invertible(n):
    lift = randomise(Lift(3, 'legall', width=8), 0.5).double()
    x = torch.randint(0, 256, (2, 3, 6, n)).double()
    s, d = lift(x)
    assert torch.equal(s, s.round()) and torch.equal(d, d.round())
    assert torch.equal(lift.inverse(s, d), x)

@pytest.mark.parametrize('C,H,W', [(3, 32, 32), (1, 28, 28), (3, 12, 20), (1, 7, 9)])
def test_flow_is_exactly_invertible_on_integers_at_every_level(C, H, W):
    f = randomise(WaveletFlowTransform(C, 'legall', width=8), 0.3).double()
    x = torch.randint(0, 256, (2, C, H, W)).double()
    for levels in range(max_levels(H, W) + 1):
        c, det = f(x, levels)
        z = torch.cat([c.flatten(1)] + [b.flatten(1) for lv in det for b in lv], 1)
        assert z.shape[1] == C * H * W and torch.equal(z, z.round())
        assert torch.equal(f.inverse(c, det), x)
    with pytest.raises(ValueError, match='levels'): f(x, max_levels(H, W) + 1)
    with pytest.raises(ValueError, match='expected images'): f(x[:, :1] if C == 3 else x.expand(-1, 3, -1, -1))

def test_untrained_flow_is_the_legall_wavelet():
    f = WaveletFlowTransform(3, 'legall', width=8)       # networks start at zero
    x = torch.randint(0, 256, (2, 3, 8, 8))
    y = rct(x)
    L, H = legall53(y)
    LL, LH = (t.transpose(-1, -2) for t in legall53(L.transpose(-1, -2)))
    LL1, b = f.split(y.float())
    assert torch.equal(LL1.long(), LL) and torch.equal(b[0].long(), LH)

def test_logdet_is_zero_against_brute_force_jacobians():
    torch.manual_seed(0)
    for C, shape in ((3, (4, 6)), (1, (5, 4))):
        f = randomise(WaveletFlowTransform(C, 'legall', width=4), 0.5).double()
        J = flow_jacobian(f, torch.rand(C, *shape, dtype=torch.float64) * 255)
        assert J.shape == (C * shape[0] * shape[1],) * 2
        sign, logdet = torch.linalg.slogdet(J)
        assert sign != 0 and abs(logdet.item()) < 1e-9
        assert (J - torch.eye(len(J), dtype=J.dtype)).abs().max() > 0.1     # a real, nonlinear transform
        # a finite-difference column agrees with the Jacobian (the autograd path is the flow's)
        x = torch.rand(C, *shape, dtype=torch.float64) * 255
        J = flow_jacobian(f, x)
        from wavenb.flow import no_round
        def fz(v):
            c, det = f(v.view(1, *x.shape), rnd=no_round)
            return torch.cat([c.flatten()] + [b.flatten() for lv in det for b in lv])
        e = torch.zeros(x.numel(), dtype=torch.float64); e[3] = 1e-6
        fd = (fz(x.flatten() + e) - fz(x.flatten() - e)) / 2e-6
        assert (fd - J[:, 3]).abs().max() < 1e-5

def test_discretised_logistic_mixture_is_normalised():
    torch.manual_seed(0)
    K = 4
    logit, mu, log_s = torch.randn(K, dtype=torch.float64), torch.randn(K, dtype=torch.float64) * 30, torch.randn(K, dtype=torch.float64)
    k = torch.arange(-1000, 1001, dtype=torch.float64)
    lp = logistic_mixture_logp(k, *(t.expand(len(k), K) for t in (logit, mu, log_s)))
    p = lp.exp()
    assert abs(p.sum().item() - 1) < 1e-9 and torch.isfinite(lp).all()
    # far tails stay finite in float32
    lp = logistic_mixture_logp(torch.tensor([1e4]), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.isfinite(lp).all()
    s = logistic_mixture_sample(*(t.expand(20000, K) for t in (logit, mu, log_s)))
    emp = torch.bincount((s + 1000).long(), minlength=2001).double() / len(s)
    assert (emp - p).abs().max() < 0.02

def test_encoder_and_decoder_contexts_agree():
    m = randomise(WaveletFlow(3, lift_width=4, prior_width=8, prior_depth=1, K=3), 0.2).double().eval()
    x = torch.randint(0, 256, (2, 3, 12, 10)).double()
    lls = []
    c, det = m.encode(x, lls=lls)
    for (z1, p1), (z2, p2) in zip(m.params(c, det, lls), m.params(c, det)):
        assert torch.equal(z1, z2) and all(torch.equal(a, b) for a, b in zip(p1, p2))

def test_training_step_lowers_bits_per_dim_and_sampling_shapes(tmp_path):
    torch.manual_seed(0)
    from wavenb.data import load_images
    x = load_images('sample', limit=32).images[:, :, 8:24, 8:24]
    m = WaveletFlow(3, lift_width=4, prior_width=8, prior_depth=1, K=3)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    xb, _ = IntCollate()([(im, 0) for im in x])
    m.eval(); before = m(xb).mean().item(); m.train()
    for _ in range(15):
        loss = bpd_loss(m(xb)); opt.zero_grad(); loss.backward(); opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.transform.parameters())   # straight-through gradients
    m.eval(); assert m(xb).mean().item() < before
    s = m.sample(4, (16, 16), generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 3, 16, 16) and s.dtype == torch.uint8
    assert m.sample(2, (28, 28)).shape == (2, 3, 28, 28)
    lls = []; m.encode(xb, lls=lls)
    sr = m.super_resolve(lls[0], 0, temperature=0)
    assert sr.shape == xb.shape
    m2 = load_flow(save_flow(m, tmp_path / 'm.pt'))
    assert torch.equal(m2(xb), m(xb))
    with pytest.raises(FileNotFoundError, match='no flow model weights'): load_flow(tmp_path / 'missing.pt')
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(ValueError, match='not a readable'): load_flow(tmp_path / 'junk.pt')

def test_round_ste_and_filters():
    t = torch.tensor([0.4, 0.5, -0.5, 2.7], requires_grad=True)
    r = round_ste(t); r.sum().backward()
    assert r.tolist() == [0., 1., 0., 3.] and t.grad.tolist() == [1.] * 4
    k = analysis_filters(WaveletFlowTransform(1, 'legall', width=0))
    h = torch.tensor([-1., 2, 6, 2, -1]) / 8
    assert torch.allclose(k['LL'][6:11, 6:11].float(), torch.outer(h, h), atol=1e-6)
    assert abs(k['LL'].sum().item() - 1) < 1e-9 and abs(k['HH'].sum().item()) < 1e-9

def _mode(p):
    "The T=0 value of a band: the rounded mean of its most likely component."
    logit, mu, _ = p
    return round_half_up(mu.gather(-1, logit.argmax(-1, keepdim=True)).squeeze(-1))

@pytest.fixture(scope='module')
def random_flow():
    return randomise(WaveletFlow(3, lift_width=4, prior_width=8, prior_depth=1, K=3), 0.2).double().eval()

def test_super_resolve_keeps_the_ll_and_draws_the_prior_mode_at_t0(random_flow):
    m, size = random_flow, (12, 10)
    x = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0)).double()
    lls = []; m.encode(x, lls=lls)
    for level in (0, 1):
        sr = m.super_resolve(lls[level], level, size, temperature=0)
        assert torch.equal(m.super_resolve(lls[level], level, size, 0, torch.Generator().manual_seed(5)), sr)   # T=0: no randomness
        lls2 = []; c, det = m.encode(sr, lls=lls2)
        assert torch.equal(lls2[level], lls[level])                         # the given LL, exactly
        assert not torch.equal(sr, x)                                       # the details were drawn, not copied
        drawn = list(m.params(c, det, lls2))[-3 * (level + 1):]             # the bands of levels `level` .. 0
        for z, p in drawn: assert torch.equal(z, _mode(p))                   # each one its prior's mode, given everything coarser
        s1, s2, s3 = (m.super_resolve(lls[level], level, size, 1.0, torch.Generator().manual_seed(k)) for k in (1, 1, 2))
        assert torch.equal(s1, s2) and not torch.equal(s1, s3)               # seeded samples
        lls3 = []; m.encode(s1, lls=lls3)
        assert torch.equal(lls3[level], lls[level])

def test_sample_at_t0_is_the_prior_mode_at_every_level(random_flow):
    m, size = random_flow, (12, 10)
    L = m.n_levels(*size)
    coarse = _mode(m.prior.coarse_params(torch.zeros(3, 3, *level_sizes(*size, L)[-1], dtype=torch.float64)))
    full = m.super_resolve(coarse, L - 1, size, temperature=0)
    c, det = m.encode(full)
    for z, p in m.params(c, det): assert torch.equal(z, _mode(p))          # the coarsest LL and every band
    s = m.sample(3, size, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(s, m.sample(3, size, 0.0, torch.Generator().manual_seed(1)))
    assert s.dtype == torch.uint8 and torch.equal(s, full.clamp(0, 255).to(torch.uint8))
    a, b, d = (m.sample(3, size, 1.0, torch.Generator().manual_seed(k)) for k in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, d)

def test_ll_offset_is_where_a_ramp_lands():
    "For LeGall 5/3 the LL sits on the even samples, for Haar between the pair; for a random nonlinear lift the centroid of the linearised"
    "filter predicts how far a small ramp moves the LL."
    assert ll_offset(WaveletFlowTransform(1, 'legall', width=0)) == pytest.approx((0, 0), abs=1e-12)
    assert ll_offset(WaveletFlowTransform(1, 'haar', width=0)) == pytest.approx((.5, .5), abs=1e-12)
    assert ll_grid(WaveletFlowTransform(1, 'haar', width=0), 1) == (4, pytest.approx((1.5, 1.5)))
    f = randomise(WaveletFlowTransform(1, 'legall', width=4), 0.3, seed=3).double()
    dy, dx = ll_offset(f)
    assert abs(dy) > 1e-3 and abs(dx) > 1e-3 and abs(dy - dx) > 1e-3       # a real, asymmetric offset
    n, eps = 64, 1e-4
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing='ij')
    LL = lambda img: f.split((128 + img)[None, None], rnd=no_round)[0][0, 0, n // 4, n // 4].item()
    with torch.no_grad():
        base = LL(0 * xx)
        gain = (LL(eps + 0 * xx) - base) / eps
        assert (LL(eps * yy) - base) / (eps * gain) - n // 2 == pytest.approx(dy, abs=1e-4)
        assert (LL(eps * xx) - base) / (eps * gain) - n // 2 == pytest.approx(dx, abs=1e-4)
