r"""The offline demo: a narrow CvT trained on scikit-learn's digits (10 classes, 1,438 train / 359 val).

Command (builds the JPEG folder tree under demo_data/digits and its ArrayRecord shards under
demo_data/digits_shards, trains into demo_out/, prints val top-1):
  ./run.sh demo
  cvt-jax train --config demo --workdir demo_out --config.data.data_dir=demo_data/digits_shards
  cvt-jax train --config demo --workdir demo_out --config.data.source=folder --config.data.data_dir=demo_data/digits

The architecture is CvT's (conv embeddings, conv projections, cls token in stage 3) at widths (32, 64, 128)
and depths (1, 1, 2), at 32x32 pixels: CvT-13 trains too slowly at this size on a laptop CPU for a demo
of minutes (docs/performance.md has the measured figures). Expected val top-1: >= 90 %.
Augmentation is the host's crop and flip only: RandAugment, erasing and mixup/cutmix hurt 8x8 digit scans.
"""

from cvt_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, epochs=30, batch=64, res=32)
  config = common.get_config("cvt-demo", args.res, weight_decay=0.05, global_batch_size=args.batch)
  config.model.dims, config.model.depths, config.model.heads = (32, 64, 128), (1, 1, 2), (1, 2, 2)
  config.model.num_classes = 10
  config.model.drop_path_rate = 0.0
  config.model.dtype = "float32"

  config.data.source = "array_record"
  config.data.name = "digits"
  config.data.eval_split = "val"
  config.data.num_workers = 2

  common.crop_and_flip_only(config)

  config.optim.lr = 2e-3
  config.optim.lr_batch_size = 64
  config.schedule.warmup_epochs = min(2, args.epochs - 1)  # `epochs=1` trains without warm-up
  config.schedule.per_step = True
  config.num_epochs = args.epochs
  config.eval_batch_size = 128  # does not divide the 359 val images: the last batch is padded and masked
  config.eval_every_epochs = 10
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.log_every_steps = 44  # every second epoch: the whole run fits on one screen
  return common.finalize(config)
