"The Learner's promises, tested the hard way: kill -9 and resume, torchrun with 2 processes, NaN, bad checkpoints."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from torch import nn
from conftest import ROOT
from wavenb.data import Collate, load_images
from wavenb.learner import (Learner, Callback, CheckpointCB, EMACB, EvalCB, LRScheduleCB, TrainingDiverged, CheckpointError,
                            load_checkpoint, ResumableSampler)

SCRIPT = ROOT / 'tests' / 'train_tiny.py'

def run(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600, **kw)

def wait_for_checkpoint(folder: Path, at_least: int, proc, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        steps = [CheckpointCB.step_of(p) for p in folder.glob("ckpt-*.pt")]
        if steps and max(steps) >= at_least: return max(steps)
        if proc.poll() is not None: raise AssertionError(f'training ended before step {at_least}: {proc.stderr.read()}')
        time.sleep(0.005)
    raise AssertionError('timed out')

def test_kill9_and_resume_gives_identical_weights(tmp_path):
    steps = 2000
    r = run('--steps', steps, '--ckpt', tmp_path / 'a', '--out', tmp_path / 'a.pt', '--flip')
    assert r.returncode == 0, r.stderr
    folder = tmp_path / 'b'
    for kill_after in (600, 1300):  # two hard kills at different points of the run
        proc = subprocess.Popen([sys.executable, str(SCRIPT), '--steps', str(steps), '--ckpt', str(folder),
                                 '--out', str(tmp_path / 'b.pt'), '--flip'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = wait_for_checkpoint(folder, kill_after, proc)
        os.kill(proc.pid, signal.SIGKILL); proc.wait()
        assert proc.returncode == -signal.SIGKILL and seen < steps, 'the process must die mid-run'
        for f in folder.glob('ckpt-*.pt'): load_checkpoint(f)   # every checkpoint on disk is whole
    r = run('--steps', steps, '--ckpt', folder, '--out', tmp_path / 'b.pt', '--flip')
    assert r.returncode == 0, r.stderr
    assert 'resumed from' in r.stdout
    a, b = torch.load(tmp_path / 'a.pt', weights_only=True), torch.load(tmp_path / 'b.pt', weights_only=True)
    for part in ('model', 'ema'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), (part, k)

def test_torchrun_two_processes_match_one_process_with_double_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = run('--steps', 30, '--batch-size', 16, '--loss-json', tmp_path / 'one.json', env=env)
    assert one.returncode == 0, one.stderr
    for attempt in range(2):
        two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(SCRIPT),
                              '--steps', '30', '--batch-size', '8', '--loss-json', str(tmp_path / 'two.json')],
                             capture_output=True, text=True, timeout=600, env=env)
        # Known, rare (seen 2 of ~40 runs on 2-core machines): a rank aborts in gloo's C++ teardown at interpreter exit, after
        # training and all output are done. One retry for that message only; any other failure, or two in a row, fails.
        if two.returncode == 0 or 'terminate called without an active exception' not in two.stderr: break
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = json.loads((tmp_path / 'one.json').read_text()), json.loads((tmp_path / 'two.json').read_text())
    assert len(l1) == len(l2) == 30
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, list(zip(l1, l2))[:5]
    assert len(set(l1)) == 30  # a real curve, different batches every step

def tiny(c=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

class Poison(Callback):
    def __init__(self, at, what='nan'): self.at, self.what = at, what
    def before_batch(self):
        if self.learn.step == self.at:
            x, y = self.learn.batch
            self.learn.batch = (x * float(self.what), y)

@pytest.mark.parametrize('what', ['nan', 'inf'])
def test_nan_guard_names_the_step_and_keeps_the_last_checkpoint(tmp_path, what):
    ds = load_images(limit=512)
    L = Learner(tiny(), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path, every=10), EMACB(), Poison(23, what)])
    with pytest.raises(TrainingDiverged, match='at step 23'): L.fit(50)
    files = CheckpointCB(tmp_path).files()
    assert [f.name for f in files] == ['ckpt-00000010.pt', 'ckpt-00000020.pt']
    L2 = Learner(tiny(), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path, every=10), EMACB()])
    L2.fit(30)                              # resumes from step 20 and trains on
    assert L2.step == 30 and all(torch.isfinite(p).all() for p in L2.raw_model.parameters())

def test_no_checkpoint_from_non_finite_weights(tmp_path):
    ds = load_images(limit=128)
    L = Learner(tiny(), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path, every=2)])
    L.fit(2)
    with torch.no_grad(): next(L.raw_model.parameters())[0] = float('nan')
    with pytest.raises(TrainingDiverged): L.cbs[0].save()
    assert [f.name for f in CheckpointCB(tmp_path).files()] == ['ckpt-00000002.pt']

def test_bad_checkpoints_name_the_file(tmp_path):
    ds = load_images(limit=128)
    L = Learner(tiny(), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path / 'ok', every=2), EMACB()])
    L.fit(2)
    good = CheckpointCB(tmp_path / 'ok').files()[-1]
    with pytest.raises(CheckpointError, match='missing.pt'): load_checkpoint(tmp_path / 'missing.pt')
    (tmp_path / 'trunc.pt').write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match='trunc.pt.*truncated or corrupt'): load_checkpoint(tmp_path / 'trunc.pt')
    (tmp_path / 'other.pt').write_bytes(b'\x00' * 100)
    with pytest.raises(CheckpointError, match='other.pt'): load_checkpoint(tmp_path / 'other.pt')
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'foreign.pt')
    with pytest.raises(CheckpointError, match='foreign.pt.*not a wavenb checkpoint'): load_checkpoint(tmp_path / 'foreign.pt')
    big = Learner(tiny(16), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path / 'ok'), EMACB()])
    with pytest.raises(CheckpointError, match=f'{good.name}.*different model.*shape'): big.fit(4)
    extra = Learner(tiny(), ds, F.cross_entropy, batch_size=32, cbs=[CheckpointCB(tmp_path / 'ok'), EMACB(), LRScheduleCB(1)])
    with pytest.raises(CheckpointError, match='no state for LRScheduleCB'): extra.fit(4)

def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, ('echo pwned',))
    torch.save({'format': 'wavenb-checkpoint-1', 'x': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match='evil.pt'): load_checkpoint(tmp_path / 'evil.pt')

def test_sampler_rejects_tiny_sets():
    with pytest.raises(ValueError, match='fewer than one global batch'): ResumableSampler(10, 8, world_size=2)

def test_bf16_autocast_path_and_compile_on_cpu(tmp_path):
    "The mixed-precision and torch.compile code paths (bf16 autocast is what CUDA runs use by default)."
    ds = load_images(limit=256)
    L = Learner(tiny(), ds, F.cross_entropy, batch_size=32, valid_ds=ds, precision='bf16', cbs=[EMACB()])
    L.fit(8)
    assert L.precision == 'bf16' and L.preds.dtype == torch.bfloat16 and next(L.raw_model.parameters()).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(L.history['loss'])))
    C = Learner(tiny(), ds, F.cross_entropy, batch_size=32, compile=True, cbs=[CheckpointCB(tmp_path, every=4)])
    C.fit(4)
    assert C.step == 4 and not any('_orig_mod' in k for k in load_checkpoint(CheckpointCB(tmp_path).files()[-1])['model'])
    with pytest.raises(ValueError, match='precision'): Learner(tiny(), ds, F.cross_entropy, precision='fp8')

class _Stateful(nn.Module):
    "A classifier with the three kinds of buffer: an integer table, a -inf additive mask, BatchNorm statistics."
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)
        self.register_buffer('band_of', torch.tensor([0, 1, 2, 3]))
        self.register_buffer('mask', torch.tensor([0.0, 0.0, 0.0, -float('inf')]))   # additive, as in attention
    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3)) * (self.band_of.float() + 1)
        return self.head(h * self.mask.exp())

class _TrackStats(Callback):
    "After EMACB, keep the expected EMA of BatchNorm's running mean by hand."
    order = 0
    def __init__(self, decay): self.decay, self.n, self.mean = decay, 0, None
    def after_step(self):
        b = self.learn.raw_model.bn.running_mean
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        self.mean = b.clone() if self.n == 0 else d * self.mean + (1 - d) * b
        self.n += 1

def test_ema_copies_state_buffers_and_averages_running_stats():
    "Integer tables must not be truncated, -inf masks must not turn into NaN, BatchNorm statistics are averaged."
    ds = load_images()
    torch.manual_seed(0)
    track = _TrackStats(0.999)
    L = Learner(_Stateful(), ds, F.cross_entropy, batch_size=16, lr=1e-3, cbs=[EMACB(0.999), track], device='cpu')
    L.fit(40)
    e, m = L.ema_model, L.raw_model
    assert torch.equal(e.band_of, m.band_of), e.band_of      # was [0, 1, 2, 2]: 3 averaged in float, truncated
    assert torch.equal(e.mask, m.mask), e.mask               # was NaN: lerp(-inf, -inf)
    assert torch.equal(e.bn.num_batches_tracked, m.bn.num_batches_tracked)
    torch.testing.assert_close(e.bn.running_mean, track.mean)
    assert not torch.equal(e.bn.running_mean, m.bn.running_mean)   # averaged, not copied
    assert torch.isfinite(torch.tensor(L.evaluate(e, ds)['loss']))

def test_time_budget_cosine_starts_where_the_warmup_ends(monkeypatch):
    "A slow first step (compilation) must not make the LR drop at the end of the warmup: the cosine runs over the time left."
    import types, wavenb.learner as Lmod
    from wavenb.learner import TimeLimitCB
    clock = iter(range(10 ** 7))
    fake = lambda: next(clock) / 64              # every reading of the clock advances 1/64 s
    monkeypatch.setattr(Lmod, 'time', types.SimpleNamespace(time=fake, perf_counter=fake))
    class Compile(Callback):
        def after_step(self):
            if self.learn.step == 1: self.learn.train_time += 0.6    # the first step took 30% of the 2-second budget
    L = Learner(nn.Linear(3 * 32 * 32, 10), load_images(), lambda p, y: F.cross_entropy(p, y), batch_size=8, lr=1e-3,
                collate=lambda b: (torch.stack([x.flatten().float() / 255 for x, _ in b]), torch.tensor([y for _, y in b])),
                cbs=[LRScheduleCB(warmup=10, minutes=2 / 60), TimeLimitCB(2 / 60), Compile()], device='cpu')
    L.fit(10 ** 5)
    lr = L.history['lr']
    assert max(lr) == pytest.approx(1e-3) and lr[-1] < 0.01 * max(lr) and L.step < 10 ** 5
    assert max(abs(b - a) for a, b in zip(lr, lr[1:])) <= 1e-4 * 1.001    # no step larger than a warmup step

def test_evaluation_during_fit_leaves_the_training_random_streams_alone(tmp_path):
    "A run stopped at step 23 (ending with its final evaluation) and resumed matches a run that never stopped."
    ds, valid = load_images(limit=256), load_images(limit=64)
    def learner(ck):
        return Learner(tiny(), ds, F.cross_entropy, batch_size=32, valid_ds=valid, collate=Collate(flip=True), seed=1,
                       cbs=[CheckpointCB(ck, every=1000), EvalCB(every=1000)])
    a = learner(tmp_path / 'a')
    a.fit(40)
    b = learner(tmp_path / 'b')
    b.fit(23)
    b = learner(tmp_path / 'b')
    b.fit(40)
    assert b.step == 40
    for (k, pa), pb in zip(a.raw_model.state_dict().items(), b.raw_model.state_dict().values()):
        assert torch.equal(pa, pb), k
