r"""CvT-W24 at 384x384 (the official weights are ImageNet-22k pre-trained, then fine-tuned on 1k).

The official code ships no 22k recipe; this config trains W24 on ImageNet-1k with the official 1k recipe
(wd 0.1, drop path 0.3), or fine-tunes converted weights with `--config.init_from`.

Command:
  cvt-jax train --config cvtw24 --workdir out/cvtw24 --config.data.data_dir=~/tensorflow_datasets
  cvt-jax train --config cvtw24:res=224 ...

Expected ImageNet-1k val top-1 of the released 22k-pretrained weights at 384: 87.6.
Batch/LR scaling: `:batch=N` keeps lr = 2e-3 * N / 2048 (linear rule); warm-up and schedule are in epochs.
Fits a TPU v5e:16x16 at 384 with `--config.model.remat=block` (`cvt-jax compile --config cvtw24 --topology
v5e:16x16`; docs/scaling.md). `--config.model.scan_blocks=true` compiles the train step several times faster
for a little more modelled HBM traffic (docs/performance.md has the figures).
"""

from cvt_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, res=384, batch=common.OFFICIAL_BATCH)
  return common.finalize(common.get_config("cvt-w24", args.res, weight_decay=0.1,
                                           global_batch_size=args.batch))
