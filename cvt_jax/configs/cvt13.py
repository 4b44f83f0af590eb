r"""CvT-13 on ImageNet-1k with the official recipe (microsoft/CvT experiments/imagenet/cvt/cvt-13-224x224.yaml).

Command:
  cvt-jax train --config cvt13 --workdir out/cvt13 \
      --config.data.data_dir=~/tensorflow_datasets
  cvt-jax train --config cvt13:res=384 --workdir out/cvt13_384 ...   # 384x384

Expected ImageNet-1k val top-1 (released weights): 81.6 at 224, 83.0 at 384.
Recipe: AdamW wd 0.05, 300 epochs, 5 warm-up epochs, cosine, global batch 2048, drop path 0.1.
Batch/LR scaling: `:batch=N` keeps lr = 2e-3 * N / 2048 (linear rule); warm-up and schedule are in epochs.
Fits (global batch 2048, compiled for TPU by `cvt-jax compile`; README "Before paying for a slice"): @224 on
v5e:2x2 with model.remat=block (13.6 GiB per chip of 16), v4:2x2x1 (28.5 of 32), v5p:2x2x1 (30.2 of 95);
@384 on v4:2x2x4 (28.3 of 32), v5e:4x8 (10.6 of 16), v5p:2x2x1 (90.1 of 95).
"""

from cvt_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, res=224, batch=common.OFFICIAL_BATCH)
  return common.finalize(common.get_config("cvt-13", args.res, weight_decay=0.05,
                                           global_batch_size=args.batch))
