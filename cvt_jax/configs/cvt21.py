r"""CvT-21 on ImageNet-1k with the official recipe (microsoft/CvT experiments/imagenet/cvt/cvt-21-*.yaml).

Command:
  cvt-jax train --config cvt21 --workdir out/cvt21 --config.data.data_dir=~/tensorflow_datasets
  cvt-jax train --config cvt21:res=384 --workdir out/cvt21_384 ...   # 384x384
  cvt-jax train --config cvt21:aug=timm ...   # the timm augmentation of the other yamls at 224

Expected ImageNet-1k val top-1 (released weights): 82.5 at 224, 83.3 at 384.
Recipe: AdamW wd 0.1, 300 epochs, 5 warm-up epochs, cosine, global batch 2048, drop path 0.1, mixup 0.8 /
cutmix 1.0, label smoothing 0.1. Augmentation (`aug`): 'yaml' follows each yaml: at 224
`cvt-21-224x224.yaml` sets TIMM_AUG.USE_LOADER false and SAMPLER repeated_aug, so the torchvision path
runs: random-resized crop with bilinear interpolation and a flip, no RandAugment, no random erasing, and
the repeated-augmentation sampler (each image of an epoch 3 times, independently cropped, on different
devices); at 384 the yaml uses timm's loader like CvT-13 (bicubic crop, RandAugment rand-m9-mstd0.5-inc1,
erasing 0.25). 'timm' takes timm's loader at 224 too. Which recipe produced the released weights is not
stated by the official code.
Batch/LR scaling: `:batch=N` keeps lr = 2e-3 * N / 2048 (linear rule); warm-up and schedule are in epochs.
Fits (global batch 2048, compiled for TPU by `cvt-jax compile`; README "Before paying for a slice"): @224 on
v5e:4x4 with model.remat=block (4.0 GiB per chip of 16); @384 on v5e:8x8 (7.2 of 16).
"""

from cvt_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, res=224, batch=common.OFFICIAL_BATCH, aug="yaml")
  if args.aug not in ("yaml", "timm"):
    raise ValueError(f"Config arg aug={args.aug!r}: use 'yaml' (as the official yaml) or 'timm'.")
  config = common.get_config("cvt-21", args.res, weight_decay=0.1, global_batch_size=args.batch)
  if args.aug == "yaml" and args.res == 224:
    config.data.interpolation = "bilinear"
    config.data.repeated_augmentation = 3
    config.augment.randaugment = False
    config.augment.erasing_prob = 0.0
  return common.finalize(config)
