"wavenb.codec on the CPU: rANS round trips, quantised CDFs, bit-exact files of real images, errors, progressive decoding, the CLI."
import numpy as np, pytest, torch
from PIL import Image
from tests.conftest import run_cli
from wavenb.data import load_images
import torch.nn.functional as F
from wavenb.flow import WaveletFlow, save_flow, load_flow
from wavenb.codec import (RansEncoder, RansDecoder, M, quantised_cdf, mixture_tables, compress, decompress, theoretical_bits,
                          progressive, read_header, CodecError, upsample, super_resolution, coded_subset, baseline_bytes,
                          flow_report, evaluate_flow, train_flow, load_flow_run, model_id, _header, _crc, MAX_VALUES)
from wavenb.run import SHARED

def small_flow(C=3, seed=0, std=0.05):
    torch.manual_seed(seed)
    m = WaveletFlow(C, lift_width=4, prior_width=8, prior_depth=1, K=3)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * std)   # nonzero lifting networks: rounding matters
    return m.eval()


pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def crops():
    return load_images('sample', limit=6).images[:, :, 4:20, 6:22].contiguous()   # real images, 16x16

@pytest.mark.parametrize('G,S,alphabet', [(1, 5000, 2), (5, 2000, 300), (16, 500, 60000)])
def test_rans_round_trips_random_streams(G, S, alphabet):
    rng = np.random.default_rng(G)
    freqs = rng.integers(1, 1000, alphabet).astype(np.float64) ** 3
    freqs = np.maximum(np.floor(freqs / freqs.sum() * (M - alphabet)).astype(np.int64), 0) + 1
    freqs[0] += M - freqs.sum()
    cum = np.concatenate([[0], np.cumsum(freqs)])
    sym = rng.choice(alphabet, size=(S, G), p=freqs / M)
    lens = rng.integers(S // 2, S + 1, G); lens[0] = S       # streams of different lengths
    lens = np.sort(lens)[::-1]                                # the active streams are always a prefix
    enc = RansEncoder(G)
    for t in reversed(range(S)):
        n = int((lens > t).sum()); enc.put(cum[sym[t, :n]], freqs[sym[t, :n]], n)
    streams = enc.streams()
    dec = RansDecoder(streams)
    for t in range(S):
        n = int((lens > t).sum())
        s = np.searchsorted(cum, dec.slot(n), side='right') - 1
        assert (s == sym[t, :n]).all(), t
        dec.advance(cum[s], freqs[s], n)
    bits = 32 * sum(map(len, streams)); info = -np.log2(freqs[np.concatenate([sym[:l, k] for k, l in enumerate(lens)])] / M).sum()
    assert info <= bits <= info * 1.001 + 64 * G + 64

def test_quantised_cdf_gives_every_value_a_frequency():
    m = small_flow(1, std=0.5).double()
    p = m.prior.band_params(0, 0, [torch.rand(2, 1, 4, 4, dtype=torch.float64) * 255], (4, 4))
    tab = mixture_tables(p)
    lo, hi = -700, 900
    i = np.arange(lo, hi + 2)[:, None, None] + np.zeros((1,) + tab[0].shape[1:], np.int64)
    c = quantised_cdf(i, tuple(t[:, None] for t in tab), lo, hi)
    assert (c[0] == 0).all() and (c[-1] == M).all() and (np.diff(c, axis=0) >= 1).all()

@pytest.mark.parametrize('C,mode,shape', [(3, 3, (16, 16)), (1, 1, (16, 16)), (3, 3, (13, 10)), (3, 1, (16, 16)), (1, 3, (9, 16))])
def test_real_images_round_trip_bit_exactly(crops, C, mode, shape):
    x = crops[:, :, :shape[0], :shape[1]].contiguous()
    if mode == 1: x = x[:, 1:2].contiguous()
    m = small_flow(C)
    data = compress(m, x, streams=4)
    back = decompress(m, data)
    assert back.dtype == torch.uint8 and torch.equal(back, x)
    if C == mode:   # the file is as long as the model says, plus the header and the final states
        theo = theoretical_bits(m, x)
        h = read_header(data)
        payload = 8 * (len(data) - h['offset'])
        assert theo * 0.999 <= payload <= theo * 1.01 + 64 * h['G'] + 64

def test_bad_streams_raise_clear_errors(crops, tmp_path):
    m = small_flow(3)
    data = compress(m, crops[:2], streams=2)
    with pytest.raises(CodecError, match='not a wavenb flow stream'): decompress(m, b'GIF89a' + bytes(64))
    with pytest.raises(CodecError, match='not a wavenb flow stream'): decompress(m, b'')
    off = read_header(data)['offset']
    for cut in (3, 10, off - 2, off + 6, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError, match='truncated'): decompress(m, data[:cut])
    for pos in (off - 1, off + 12, len(data) // 2, len(data) - 3):
        bad = bytearray(data); bad[pos] ^= 0x10
        with pytest.raises(CodecError, match='corrupted'): decompress(m, bytes(bad))
    with pytest.raises(CodecError, match='another model'): decompress(small_flow(3, seed=1), data)
    with pytest.raises(ValueError, match='uint8'): compress(m, crops.float())

def test_progressive_prefixes_decode_the_coarse_levels(crops):
    m = small_flow(3)
    one = compress(m, crops[:1], streams=1)
    steps = progressive(m, one)
    assert [s['level'] for s in steps] == [4, 3, 2, 1, 0] and torch.equal(steps[-1]['image'], crops[0])
    assert all(a['bytes'] < b['bytes'] for a, b in zip(steps, steps[1:])) and steps[-1]['bytes'] == len(one)
    k = 2
    got = []
    with pytest.raises(CodecError, match='truncated'):
        decompress(m, one[:steps[k]['bytes']], progress=lambda l, LL, w: got.append(l), check=False)
    assert got[:k + 1] == [4, 3, 2]

def cli(capsys, *args):
    "Run the wavenb command in this process (the console script is checked once with run_cli below)."
    from wavenb.cli import main
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err

def test_cli_compress_decompress_and_errors(tmp_path, crops, capsys):
    model = save_flow(small_flow(3), tmp_path / 'model.pt')
    rgb, grey = tmp_path / 'rgb.png', tmp_path / 'grey.png'
    Image.fromarray(crops[0].permute(1, 2, 0).numpy()).save(rgb)
    Image.fromarray(crops[1, 0, :, :13].numpy()).save(grey)
    r = run_cli('compress', rgb, tmp_path / 'x.wnb', '--weights', model)           # as a user runs it
    assert r.returncode == 0, r.stderr
    r = run_cli('decompress', tmp_path / 'x.wnb', tmp_path / 'back.png', '--weights', model)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(rgb)), np.asarray(Image.open(tmp_path / 'back.png')))
    assert cli(capsys, 'compress', grey, tmp_path / 'g.wnb', '--weights', model)[0] == 0
    assert cli(capsys, 'decompress', tmp_path / 'g.wnb', tmp_path / 'g.png', '--weights', model)[0] == 0
    a, b = Image.open(grey), Image.open(tmp_path / 'g.png')
    assert a.mode == b.mode == 'L' and np.array_equal(np.asarray(a), np.asarray(b))
    rc, err = cli(capsys, 'decompress', rgb, tmp_path / 'y.png', '--weights', model)
    assert rc == 2 and 'not a wavenb flow stream' in err
    rc, err = cli(capsys, 'compress', rgb, tmp_path / 'z.wnb', '--weights', tmp_path / 'none.pt')
    assert rc == 2 and 'no flow model weights' in err
    (tmp_path / 'imgs' / 'deep').mkdir(parents=True)                   # a folder, with a subfolder
    Image.fromarray(crops[2].permute(1, 2, 0).numpy()).save(tmp_path / 'imgs' / 'a.png')
    Image.fromarray(crops[3, 0].numpy()).save(tmp_path / 'imgs' / 'deep' / 'b.png')
    assert cli(capsys, 'compress', tmp_path / 'imgs', tmp_path / 'wnb', '--weights', model)[0] == 0
    assert cli(capsys, 'decompress', tmp_path / 'wnb', tmp_path / 'back', '--weights', model)[0] == 0
    for f in ('a.png', 'deep/b.png'):
        assert np.array_equal(np.asarray(Image.open(tmp_path / 'imgs' / f)), np.asarray(Image.open(tmp_path / 'back' / f)))
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / 'rgba.png')
    rc, err = cli(capsys, 'compress', tmp_path / 'rgba.png', tmp_path / 'z.wnb', '--weights', model)
    assert rc == 2 and "mode 'RGBA'" in err

def test_cli_train_flow_end_to_end(tmp_path, crops, capsys):
    for i, im in enumerate(crops):        # a tiny ImageFolder of 16x16 PNGs
        d = tmp_path / 'data' / f'c{i % 2}'; d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f'{i}.png')
    rc, err = cli(capsys, 'train', 'flow', '--data', tmp_path / 'data', '--test-data', tmp_path / 'data', '--steps', 2, '--batch-size', 2,
                '--lift-width', 4, '--prior-width', 8, '--prior-depth', 1, '--warmup', 1, '--ckpt', tmp_path / 'ck',
                '--out', tmp_path / 'res', '--code-images', 3, '--per-image-files', 2, '--streams', 3, '--sr-images', 2, '--device', 'cpu')
    assert rc == 0, err[-2000:]
    import json
    met = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert met['steps'] == 2 and (tmp_path / 'ck' / 'model.pt').is_file()
    for f in ('progressive.png', 'sr_x2.png', 'samples.png', 'filters.png'): assert (tmp_path / 'res' / f).is_file()
    # the comparison with PNG/WebP: one real file per image for every codec, on the same coded images
    m, model = met['metrics'], load_flow(tmp_path / 'ck')
    test = load_images(str(tmp_path / 'data'))
    sub = coded_subset(test.images, 3)[:2]          # 3 coded images, the first 2 also one file each
    n = sub.numel()
    per = m['per_image_bpd']
    assert m['coded_images'] == 3 and m['per_image_files'] == 2 and set(per) == {'flow', 'png', 'webp_lossless', 'jpegxl'}
    assert per['flow'] == pytest.approx(8 * sum(len(compress(model, im[None], 1)) for im in sub) / n, rel=1e-12)
    assert {k: per[k] for k in ('png', 'webp_lossless', 'jpegxl')} == pytest.approx({k: 8 * v / n for k, v in baseline_bytes(sub).items()}, rel=1e-12)
    assert m['per_image_saving_vs_webp_pct'] == pytest.approx(100 * (1 - per['flow'] / per['webp_lossless']))
    assert 'saving_vs_webp_pct' not in m and 'one file per image' in flow_report(tmp_path / 'res')
    with pytest.raises(ValueError, match='per_image_files'): evaluate_flow(model, test, tmp_path / 'x', per_image_files=0)
    # the trained model's file, written and read back by the commands, has exactly the original pixels
    src = tmp_path / 'data' / 'c0' / '0.png'
    assert cli(capsys, 'compress', src, tmp_path / 'a.wnb', '--weights', tmp_path / 'ck')[0] == 0
    assert cli(capsys, 'decompress', tmp_path / 'a.wnb', tmp_path / 'a.png', '--weights', tmp_path / 'ck')[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'a.png')), np.asarray(Image.open(src)))
    assert torch.equal(decompress(model, (tmp_path / 'a.wnb').read_bytes()), crops[:1])
    # model.pt is the EMA weights of the run's last checkpoint, which load_flow_run rebuilds from the folder (raw weights on request)
    ema, cfg = load_flow_run(tmp_path / 'ck')
    assert model_id(ema) == model_id(model) and model_id(load_flow_run(tmp_path / 'ck', ema=False)[0]) != model_id(model)
    assert cfg['test_sha256'] == test.checksum and cfg['holdout'] is None
    # wavenb eval flow: every image in its own file, timed and checked, against the baselines on the same images
    rc, err = cli(capsys, 'eval', 'flow', '--ckpt', tmp_path / 'ck', '--test-data', tmp_path / 'data', '--images', 3,
                  '--out', tmp_path / 'ev')
    assert rc == 0, err[-2000:]
    ev = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    e, sub = ev['metrics'], coded_subset(test.images, 3)
    assert e['images'] == 3 and e['same_test_images_as_run'] and ev['git_commit'] and ev['config'] == cfg
    assert e['bpd_per_image_file'] == pytest.approx(8 * sum(len(compress(model, im[None], 1)) for im in sub) / sub.numel(), rel=1e-12)
    assert e['bpd_per_image_jpegxl'] == pytest.approx(8 * baseline_bytes(sub)['jpegxl'] / sub.numel(), rel=1e-12)
    assert e['bpd_model'] == pytest.approx(model(sub.float()).mean().item(), rel=1e-4)
    assert e['file_overhead_vs_model_pct'] == pytest.approx(100 * (e['bpd_per_image_file'] / e['bpd_model'] - 1))
    assert 0 < e['compress_plus_decompress_ms']['median'] and e['sr_images'] == 3 and 'bicubic' in e['sr_x4']
    for f in ('progressive.png', 'sr_x2.png', 'sr_x4.png'): assert (tmp_path / 'ev' / f).is_file()
    rc, err = cli(capsys, 'eval', 'flow', '--ckpt', tmp_path / 'ck')
    assert rc == 2 and 'give --test-data' in err

def test_train_flow_holds_out_a_seeded_tenth_by_default(tmp_path):
    r = train_flow('sample', steps=2, batch_size=4, lift_width=4, prior_width=8, prior_depth=1, K=3, warmup=1, ckpt=tmp_path / 'ck',
                   out=tmp_path / 'res', code_images=2, per_image_files=1, streams=2, sr_images=2, device='cpu', seed=1)
    ds = load_images('sample')
    held = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:len(ds) // 10])
    import json
    met = json.loads((tmp_path / 'res' / 'metrics.json').read_text())
    assert r == met['metrics'] and r['test_images'] == 200 and met['test_dataset']['sha256'] == held.checksum
    assert (met['config']['holdout'], met['config']['split_seed']) == (200, 1)
    assert met['published_bpd_cifar10'] and {'bpd_model_fp32', 'bpd_file', 'per_image_bpd', 'sr_x2', 'sr_x4', 'progressive_bytes'} <= set(r)

def test_help_lists_the_shared_options(capsys):
    r = run_cli('train', 'flow', '--help')                      # the installed console script
    assert r.returncode == 0, r.stderr
    h = ' '.join(r.stdout.split())                              # argparse wraps long lines
    for o in ('data', 'split', 'test_data', 'steps', 'minutes', 'batch_size', 'lr', 'warmup', 'ema', 'ckpt', 'ckpt_every', 'out', 'device', 'seed'):
        assert f"--{o.replace('_', '-')} " in h and SHARED[o] in h, o
    assert '--test-split' not in h and '--max-minutes' not in h and '--init {legall,haar}' in h
    for cmd, args in (('compress', 'image output'), ('decompress', 'file output')):
        with pytest.raises(SystemExit): cli(capsys, cmd, '--help')
        assert f'usage: wavenb {cmd} [-h] [--weights WEIGHTS] {args}' in capsys.readouterr().out

def test_upsample_reproduces_quadratics_on_the_sample_grid():
    poly = lambda y, x: 40 + 3 * y - 2 * x + 0.2 * y * y - 0.1 * x * y + 0.15 * x * x
    n = 9
    for s, o in ((2, 0.), (4, 0.), (4, 1.5), (2, 0.5)):
        i = torch.arange(n, dtype=torch.float64)
        y, x = torch.meshgrid(torch.arange(s * n, dtype=torch.float64), torch.arange(s * n, dtype=torch.float64), indexing='ij')
        inner = (slice(s + 2, s * (n - 3)),) * 2              # pixels whose four taps are all real samples
        low = poly(s * i[:, None] + o, s * i + o)
        assert (upsample(low, (s * n, s * n), s, (o, o)) - poly(y, x))[inner].abs().max() < 1e-9
        near = upsample(low, (s * n, s * n), s, (o, o), mode='nearest')
        j = torch.floor((torch.arange(s * n) - o) / s + .5).clamp(0, n - 1).long()      # the nearest sample of each pixel
        assert torch.equal(near, low[j][:, j])
        wrong = (s - 1) / 2 if o == 0 else 0.                  # the other grid misses by the shift times the slope
        assert (upsample(low, (s * n, s * n), s, (wrong, wrong)) - poly(y, x))[inner].abs().max() > 0.5
    low = torch.rand(2, 3, 7, 5) * 255                          # a = -3/4 on the block-centre grid is PyTorch's bicubic
    ref = F.interpolate(low, scale_factor=4, mode='bicubic', align_corners=False)
    assert torch.allclose(upsample(low, ref.shape[-2:], 4, (1.5, 1.5), a=-0.75), ref, atol=1e-3)
    with pytest.raises(ValueError, match='mode'): upsample(low, (14, 10), 2, mode='bilinear')

@pytest.mark.parametrize('init', ['legall', 'haar'])
def test_sr_baselines_upsample_the_ll_on_its_own_grid(init):
    "A ramp image: the flow's LL is the ramp on its sample grid, so bicubic gives the ramp back and nearest is off by at most half a step."
    y, x = torch.meshgrid(torch.arange(48), torch.arange(48), indexing='ij')
    img = (10 + 2 * y + 2 * x).to(torch.uint8)[None, None]
    m = WaveletFlow(1, init, lift_width=0, prior_width=8, prior_depth=1).eval()
    for level in (0, 1):
        r = super_resolution(m, img, level, temperatures=())
        s = r['factor']
        inner = (slice(0, 1), slice(0, 1), slice(2 * s, 48 - 4 * s), slice(2 * s, 48 - 4 * s))   # away from the borders
        err = (r['images']['bicubic'].int() - img.int())[inner].abs().max().item()
        assert err == 0, (init, level, err)
        assert (r['images']['nearest'].int() - img.int())[inner].abs().max() <= 2 * s       # half a step in each axis, slope 2

@pytest.mark.parametrize('G', [1, 3])
def test_both_coders_round_trip_to_the_same_size(crops, G):
    m = small_flow(3)
    files = {c: compress(m, crops[:3], streams=G, coder=c) for c in ('rans', 'constriction')}
    for c, data in files.items():
        assert read_header(data)['coder'] == c
        assert torch.equal(decompress(m, data), crops[:3])
    assert abs(len(files['rans']) - len(files['constriction'])) <= 4 * 2 * G     # within 2 words per stream

@pytest.mark.parametrize('coder', ['rans', 'constriction'])
def test_damaged_streams_never_decode_to_a_wrong_image_unchecked(crops, coder):
    "With the CRC and length checks off (the path progressive decoding takes): an error or the exact image."
    m = small_flow(3)
    one = compress(m, crops[:1], streams=1, coder=coder)
    off = read_header(one)['offset']
    damaged = [one[:cut] for cut in range(off, len(one), 4)] + [one + bytes(4)]
    h = read_header(one)
    head = _header(coder, 3, 3, h['H'], h['W'], 1, 1, h['lo'], h['hi'], model_id(m), [2 ** 32 - 1])   # a damaged length
    damaged.append(bytes(head) + one[off - 4:])
    rng = np.random.default_rng(0)
    for bit in rng.choice(np.arange(8 * off, 8 * len(one)), 64, replace=False):
        b = bytearray(one); b[bit // 8] ^= 1 << (bit % 8); damaged.append(bytes(b))
    for d in damaged:
        try: out = decompress(m, d, check=False)
        except CodecError: continue
        assert torch.equal(out, crops[:1])

def _refit(data: bytes, mid: bytes, **fields) -> bytes:
    "`data` with header fields replaced and a valid CRC: what a crafted file can claim."
    h = read_header(data)
    v = dict(h, **fields)
    head = _header(v['coder'], v['mode'], v['channels'], v['H'], v['W'], v['N'], v['G'], v['lo'], v['hi'], mid, v['lengths'])
    body = data[h['offset']:]
    return bytes(head) + _crc(mid, head, body).to_bytes(4, 'little') + body

@pytest.mark.parametrize('coder', ['rans', 'constriction'])
def test_fuzzed_files_give_an_error_or_the_exact_images(crops, coder):
    """Every cut, every header bit flipped, 64 body bits flipped, random bodies, appended bytes, and crafted headers with
    a valid CRC (huge counts): a CodecError or the exact images, never a wrong image, quickly (at most a few times the
    time of the valid file, on slow machines too) and in little memory."""
    import time, tracemalloc
    m, x = small_flow(3), crops[:2]
    mid = model_id(m)
    data = compress(m, x, streams=2, coder=coder)
    off = read_header(data)['offset']
    rng = np.random.default_rng(1)
    cases = [data[:cut] for cut in range(len(data))]
    for bit in list(range(8 * off)) + list(rng.choice(np.arange(8 * off, 8 * len(data)), 64, replace=False)):
        b = bytearray(data); b[bit // 8] ^= 1 << (bit % 8); cases.append(bytes(b))
    cases += [data[:off] + rng.bytes(len(data) - off) for _ in range(8)]
    cases += [data + b'\x00', data + bytes(4), data + rng.bytes(100)]
    cases += [_refit(data, mid, N=n) for n in (3, 1000, MAX_VALUES // (3 * 16 * 16))]     # more images than coded
    cases += [_refit(data, mid, G=1, lengths=[sum(read_header(data)['lengths'])])]     # the two streams as one
    cases += [_refit(data, mid, mode=1), _refit(data, mid, H=15), _refit(data, mid, lo=read_header(data)['lo'] + 1)]
    wrong, slowest = 0, 0.
    tracemalloc.start()
    t = time.perf_counter(); decompress(m, data); valid = time.perf_counter() - t    # a valid file, on this machine
    for d in cases:
        t = time.perf_counter()
        try: out = decompress(m, d)
        except CodecError: out = None
        slowest = max(slowest, time.perf_counter() - t)
        wrong += out is not None and not torch.equal(out, x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert wrong == 0 and len(cases) > 8 * off + 64
    assert slowest < max(2, 3 * valid) and peak < 50e6, (slowest, valid, peak)     # no input costs much more than a valid one
