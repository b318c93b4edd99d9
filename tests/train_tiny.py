"""A small, complete training script for the Learner tests (and a template for real ones).

    python tests/train_tiny.py --steps 2000 --ckpt DIR --out weights.pt          # CPU, resumable
    torchrun --standalone --nproc_per_node 2 tests/train_tiny.py --steps 30 --batch-size 8 --loss-json loss.json
    python tests/train_tiny.py --device cuda --steps 300 --batch-size 256 --width 64 --results OUT   # GPU: bf16, throughput
"""
import argparse, json
import torch, torch.nn.functional as F
from torch import nn
from wavenb.data import load_images, Collate
from wavenb.learner import Learner, LRScheduleCB, GradClipCB, EMACB, CheckpointCB, EvalCB, ResultsCB, ProgressCB

p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=2000)
p.add_argument('--batch-size', type=int, default=16)
p.add_argument('--width', type=int, default=8)
p.add_argument('--ckpt', help='checkpoint folder (resumes from it)')
p.add_argument('--every', type=int, default=100, help='checkpoint interval')
p.add_argument('--out', help='write final weights (model + EMA) here')
p.add_argument('--loss-json', help='write the loss curve (JSON) here')
p.add_argument('--flip', action='store_true', help='random flips (draws from the RNG every batch)')
p.add_argument('--device', default='cpu')
p.add_argument('--results', help='write metrics.json here (ResultsCB)')
a = p.parse_args()

if a.device == 'cpu':
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)   # identical arithmetic in every run, and cheap
ds = load_images()
perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
train, valid = ds.subset(perm[:1600]), ds.subset(perm[1600:])
torch.manual_seed(0)
c = a.width
model = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.GroupNorm(2, c), nn.GELU(), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GELU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10))
cbs = [LRScheduleCB(50), GradClipCB(1.0), EMACB(0.99)]
if a.ckpt: cbs.append(CheckpointCB(a.ckpt, every=a.every, keep=3))
if a.results:
    acc = lambda preds, y: (preds.argmax(-1) == y).float().mean()
    cbs += [EvalCB(every=a.steps, metrics={'acc': acc}), ProgressCB(every=50), ResultsCB(a.results, dataset=train, experiment='train_tiny')]
learn = Learner(model, train, F.cross_entropy, batch_size=a.batch_size, valid_ds=valid, lr=3e-3, seed=0,
                collate=Collate(flip=a.flip), device=a.device, cbs=cbs)
learn.fit(a.steps)
if learn.is_main:
    if a.out: torch.save({'model': learn.raw_model.state_dict(), 'ema': learn.ema.state_dict()}, a.out)
    if a.loss_json: json.dump(learn.history['loss'], open(a.loss_json, 'w'))
