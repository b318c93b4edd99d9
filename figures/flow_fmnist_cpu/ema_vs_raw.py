"""Bits/dim of a `wavenb train flow` checkpoint's raw weights vs its EMA weights (`model.pt`) on the Fashion-MNIST test split.

    python figures/flow_fmnist_cpu/ema_vs_raw.py CKPT_DIR [OUT.json]

CKPT_DIR is the --ckpt folder of the run (flow_fmnist_cpu: /tmp/lead/ck_fm_cpu, from the command in its metrics.json).
"""
import sys
from pathlib import Path
import torch
from wavenb.data import load_images
from wavenb.flow import load_flow
from wavenb.learner import load_run
from wavenb.metrics import write_metrics

ckpt = Path(sys.argv[1])
torch.set_num_threads(1)
ema = load_flow(ckpt).eval()                        # model.pt: the EMA weights the run evaluated and coded with
raw = load_flow(ckpt).eval()
cfg, ck, path = load_run(ckpt, 'train_flow'); raw.load_state_dict(ck['model'])
x = load_images('fashion_mnist', 'test').images.float()
with torch.no_grad():
    bpd = {name: torch.cat([m(x[i:i + 500]) for i in range(0, len(x), 500)]).mean().item() for name, m in (('ema', ema), ('raw', raw))}
print(bpd)
if len(sys.argv) > 2: write_metrics(sys.argv[2], dict(bpd_test_ema=bpd['ema'], bpd_test_raw=bpd['raw']), checkpoint=str(path), step=ck['step'], test_images=len(x))
