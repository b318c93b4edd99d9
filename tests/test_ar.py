"wavenb.ar on the CPU: causality, the full model is trained (T inputs for T targets), KV-cache sampling, top-k/top-p, NLL in bits, CLI."
import json, math
import pytest, torch
from torch import nn
from wavenb.ar import (CodePrior, prior_loss, sample_codes, filter_logits, prior_nll, codes_to_seq, seq_to_codes, CodeSet,
                       collate_codes, load_ar)

SHAPES, K = [(2, 2), (2, 2), (3, 3)], 6

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
    r = prior_nll(prior, torch.randint(0, K, (7, prior.T)), image_dims=192)
    assert abs(r['bits_per_code'] - math.log2(K)) < 1e-5 and abs(r['bits_per_dim'] - math.log2(K) * prior.T / 192) < 1e-6
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

def test_cli_train_and_sample(tmp_path):
    from conftest import run_cli
    from wavenb.vqvae import train_vqvae
    train_vqvae('sample', steps=2, batch_size=8, K=16, D=4, width=8, n_res=1, down=3, ckpt=tmp_path / 'vq', out=tmp_path / 'vqres',
                warmup=1, holdout=32, device='cpu')
    r = run_cli('train', 'ar', '--vqvae', tmp_path / 'vq', '--d', '16', '--layers', '2', '--heads', '2', '--steps', '3', '--batch-size', '8',
                '--warmup', '1', '--holdout', '32', '--throughput-n', '2', '--ckpt', tmp_path / 'ar', '--out', tmp_path / 'res', '--device', 'cpu')
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert m['steps'] == 3 and m['config']['layers'] == 2 and m['metrics']['tokens_per_image'] == 16
    assert 0 < m['metrics']['bits_per_code'] and m['metrics']['throughput']['same_codes_fraction'] == 1.0
    assert (tmp_path / 'res' / 'samples.png').is_file()
    prior, cfg = load_ar(tmp_path / 'ar')
    assert len(prior.blocks) == 2 and prior.T == 16
    r = run_cli('sample', 'ar', '--ckpt', tmp_path / 'ar', '--n', '4', '--top-k', '5', '--out', tmp_path / 's.png', '--device', 'cpu')
    assert r.returncode == 0 and (tmp_path / 's.png').is_file(), r.stderr[-2000:]
    with pytest.raises(FileNotFoundError, match='config.json'): load_ar(tmp_path / 'nothing')   # the CLI: one line, exit code 2
    with pytest.raises(ValueError, match='not a train_ar'): load_ar(tmp_path / 'vq')
