r"""CvT-W24 at 384x384 (the official weights are ImageNet-22k pre-trained, then fine-tuned on 1k).

The official code ships no 22k recipe; this config trains W24 on ImageNet-1k with the official 1k recipe
(wd 0.1, drop path 0.3), or fine-tunes converted weights with `--config.init_from`.

Command:
  cvt-jax train --config cvtw24 --workdir out/cvtw24 --config.data.data_dir=~/tensorflow_datasets
  cvt-jax train --config cvtw24:res=224 ...

Expected ImageNet-1k val top-1 of the released 22k-pretrained weights at 384: 87.6.
Batch/LR scaling: `:batch=N` keeps lr = 2e-3 * N / 2048 (linear rule); warm-up and schedule are in epochs.
Fits (global batch 2048, compiled for TPU by `cvt-jax compile`; README "Before paying for a slice"), with
model.remat=block: @384 on v5e:16x16 (4.9 GiB per chip of 16) and v5p:4x4x2 (31.6 of 95); @224 on v5e:16x16
(4.6 of 16). `--config.model.scan_blocks=true` compiles its train step 3.5x faster (92 s instead of 332 s
for v5e:16x16 on a 2-core CPU host) for 4 % more modelled HBM traffic per step (README, the switches).
"""

from cvt_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, res=384, batch=common.OFFICIAL_BATCH)
  return common.finalize(common.get_config("cvt-w24", args.res, weight_decay=0.1,
                                           global_batch_size=args.batch))
