"wavenb.data: archives, folders, caching, loaders and the errors a user sees."
import os
import numpy as np, pytest, torch
from PIL import Image
from wavenb.data import (PackedJPEG, pack_folder, pack_subset, load_images, get_loader, ImageSet,
                         sample_path, to_float, to_uint8, cache_dir)
from wavenb.haar import dwt2_stacked, wavedec2

def make_tree(root, sizes=((8, 8),) * 3, fmt='JPEG'):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        d = root / f'class{i % 2}'; d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f'{i}.{"jpg" if fmt == "JPEG" else "png"}', fmt)
    return root

def test_sample_is_the_default_and_balanced():
    ds = load_images()
    assert ds.shape == (3, 32, 32) and len(ds) == 2000 and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist() == [200] * 10
    assert 'JPEG copy' in ds.name and len(ds.checksum) == 64
    assert sample_path().stat().st_size <= 1_000_000

def test_sample_is_a_byte_exact_subset_of_the_shared_archive():
    full = sample_path().parent.parent.parent / 'shared' / 'data' / 'cifar10-test.npz'
    if not full.is_file(): pytest.skip('shared data not present')
    big, small = PackedJPEG(full), PackedJPEG(sample_path())
    files = {big.jpeg_bytes('test', i) for i in range(big.count('test'))}
    assert all(small.jpeg_bytes('test', i) in files for i in range(small.count('test')))

def test_folder_roundtrip(tmp_path):
    tree = make_tree(tmp_path / 'tree')
    out = pack_folder(tree, tmp_path / 'a.npz', split='val')
    pj = PackedJPEG(out); pj.verify('val')
    files = sorted((tree).rglob('*.jpg'))
    assert [pj.jpeg_bytes('val', i) for i in range(3)] == [f.read_bytes() for f in sorted(files, key=lambda p: (p.parent.name, p.name))]
    a, b = load_images(out), load_images(tree)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.checksum == b.checksum
    assert load_images(out, 'val') is not None
    with pytest.raises(ValueError, match="no split 'train'"): load_images(out, 'train')

def test_decode_cache_is_used_and_survives_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv('WAVENB_CACHE', str(tmp_path / 'cache'))
    out = pack_folder(make_tree(tmp_path / 'tree'), tmp_path / 'a.npz')
    load_images(out, cache=True)
    cached = list((cache_dir() / 'decoded').glob('*.npy'))
    assert len(cached) == 1
    cached[0].write_bytes(b'garbage')          # a broken cache file is rebuilt, not trusted
    from wavenb.data import _load
    _load.cache_clear()
    ds = load_images(out)
    assert ds.images.shape == (3, 3, 8, 8) and np.load(cached[0]).shape == (3, 8, 8, 3)

def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.npz'): load_images(tmp_path / 'nowhere.npz')
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='junk.npz'): load_images(tmp_path / 'junk.npz')
    np.savez(tmp_path / 'other.npz', x=np.zeros(3))
    with pytest.raises(ValueError, match='not a packed JPEG archive'): load_images(tmp_path / 'other.npz')
    out = pack_folder(make_tree(tmp_path / 'tree'), tmp_path / 'a.npz')
    z = dict(np.load(out)); z['train_data'][10] ^= 0xFF; np.savez(tmp_path / 'bad.npz', **z)
    with pytest.raises(ValueError, match='bad.npz.*checksum'): load_images(tmp_path / 'bad.npz')
    mixed = make_tree(tmp_path / 'mixed', sizes=((8, 8), (8, 8), (16, 8)))
    with pytest.raises(ValueError, match='differ in size'): load_images(mixed)
    assert load_images(mixed, size=8).shape == (3, 8, 8)
    png = make_tree(tmp_path / 'png', fmt='PNG')
    with pytest.raises(ValueError, match='not a JPEG.*--quality'): pack_folder(png, tmp_path / 'p.npz')
    with pytest.raises(FileNotFoundError, match='download=True'): load_images('cifar10', root=tmp_path)
    with pytest.raises(ValueError, match="splits"): load_images('cifar10', 'validation', root=tmp_path)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no class subfolders'): load_images(tmp_path / 'empty')

def test_pack_subset_is_balanced_and_seeded(tmp_path):
    a = pack_subset(sample_path(), tmp_path / 'a.npz', per_class=5, seed=1)
    b = pack_subset(sample_path(), tmp_path / 'b.npz', per_class=5, seed=1)
    c = pack_subset(sample_path(), tmp_path / 'c.npz', per_class=5, seed=2)
    la, lb, lc = (load_images(p) for p in (a, b, c))
    assert torch.bincount(la.labels).tolist() == [5] * 10
    assert la.checksum == lb.checksum != lc.checksum

def test_loaders_pixel_and_wavelet():
    ds = load_images()
    x, y = next(iter(get_loader(ds, 8, seed=3)))
    w, y2 = next(iter(get_loader(ds, 8, seed=3, wavelet='haar')))
    p, _ = next(iter(get_loader(ds, 8, seed=3, wavelet='db2', level=2)))
    assert torch.equal(y, y2) and torch.allclose(dwt2_stacked(x), w) and len(p) == 3
    s, _ = next(iter(get_loader(ds, 8, seed=3, scale='symmetric')))
    assert torch.allclose(s, x * 2 - 1)
    f, _ = next(iter(get_loader(ds, 2000, shuffle=False, flip=True)))
    flipped = (f != to_float(ds.images)).flatten(1).any(1)
    assert 0.4 < flipped.float().mean() < 0.6
    assert torch.allclose(torch.where(flipped[:, None, None, None], f.flip(-1), f), to_float(ds.images))
    with pytest.raises(ValueError, match='scale'): get_loader(ds, 8, scale='pm1')
    with pytest.raises(ValueError, match='batch_size'): get_loader(ds, 0)

def test_imageset_validation():
    with pytest.raises(ValueError, match='uint8'): ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2), ['a'], 'x')
    with pytest.raises(ValueError, match='labels'): ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3), ['a'], 'x')
    x = torch.rand(4, 3, 8, 8)
    assert (to_float(to_uint8(x)) - x).abs().max() <= 0.5 / 255 + 1e-6

@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'), reason='Debian dataset-fashion-mnist not installed')
def test_fashion_mnist_from_debian(tmp_path):
    ds = load_images('fashion_mnist', 'test', root=tmp_path)   # no download: Debian's files are used
    assert len(ds) == 10000 and ds.shape == (1, 28, 28) and ds.classes[0] == 'T-shirt/top'
    c = wavedec2(to_float(ds.images[:8]), 'haar', 2)
    assert c[0].shape == (8, 1, 7, 7)
