"""Re-measure, from the data alone, the baselines of the two committed CPU flow runs (flow_fmnist_cpu, flow_fmnist_cpu_ema_warmup).

    python figures/flow_fmnist_cpu_ema_warmup/baselines.py [OUT.json]   (default: baselines.json beside this script)

The runs' weights were not kept, so the flow's own numbers stay as committed. What needs only the data is measured again with
today's code on exactly the images the runs used (`coded_subset` of the Fashion-MNIST test split with the runs' seed):
- PNG and WebP lossless, one file per image, on the first 20 coded images: the images the runs also coded one file each
  (their `bpd_single_image_files`; evaluate_flow then coded min(20, coded images)), so the three codecs share the same files;
- nearest and bicubic super-resolution (x2, x4) of the first `--sr-images` coded images on the LL's own sample grid. The LL is
  the LeGall 5/3 one, the flow's starting transform: the runs' trained LL needs their weights. To show how far that LL is
  from the trained ones, it is also upsampled with the block-centre bicubic the runs used (`bicubic_block_centres`), to set
  beside the runs' own (superseded) `bicubic` numbers.
"""
import json, re, sys
from pathlib import Path
import torch
import torch.nn.functional as F
from wavenb.data import load_images
from wavenb.flow import WaveletFlow
from wavenb.codec import coded_subset, baseline_bytes, super_resolution, ll_to_image
from wavenb.metrics import write_metrics, psnr, ssim

here = Path(__file__).resolve().parent
runs = [here.parent / 'flow_fmnist_cpu', here]
out = Path(sys.argv[1]) if len(sys.argv) > 1 else here / 'baselines.json'

def option(cmd: str, name: str, default: int) -> int:
    m = re.search(rf'--{name}[ =](\d+)', cmd)
    return int(m.group(1)) if m else default

settings = set()
for r in runs:
    res = json.loads((r / 'metrics.json').read_text())
    settings.add((res['config']['test_sha256'], res['metrics']['coded_images'], option(res['command'], 'sr-images', 256), option(res['command'], 'seed', 0)))
if len(settings) != 1: sys.exit(f'the runs used different test images: {settings}')
sha, coded, n_sr, seed = settings.pop()
test = load_images('fashion_mnist', 'test')
if test.checksum != sha: sys.exit(f'{test.name} has checksum {test.checksum}, the runs used {sha}')
sub = coded_subset(test.images, coded, seed)
k, dims = min(20, coded), sub[0].numel()
per_image = {c: 8 * b / (k * dims) for c, b in baseline_bytes(sub[:k]).items()}

legall = WaveletFlow(1, 'legall', lift_width=0, prior_width=8, prior_depth=1).eval()   # its transform is LeGall 5/3; the prior is unused
srs, sr = sub[:n_sr], {}
for level in (0, 1):
    r = super_resolution(legall, srs, level, temperatures=())
    lls = []
    with torch.no_grad(): legall.encode(srs.float(), lls=lls)
    old = F.interpolate(ll_to_image(lls[level], False), size=srs.shape[-2:], mode='bicubic', align_corners=False).clamp(0, 255).round().to(torch.uint8)
    r['metrics']['bicubic_block_centres'] = dict(psnr=psnr(old, srs).mean().item(), ssim=ssim(old, srs).mean().item())
    sr[f"sr_x{r['factor']}"] = r['metrics']
print(json.dumps(dict(per_image_bpd=per_image, **sr), indent=1))
write_metrics(out, dict(per_image_files=k, per_image_bpd=per_image, sr_images=n_sr, **sr), device='cpu', runs=[r.name for r in runs],
              test_dataset=dict(name=test.name, sha256=sha, coded_images=coded, seed=seed),
              ll='LeGall 5/3 (the flow transform at initialisation; the runs\' trained weights were not kept)')
