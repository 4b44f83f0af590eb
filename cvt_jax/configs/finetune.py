r"""Fine-tuning a converted CvT on another dataset: the paper's recipe (SGD momentum 0.9, batch 512, cosine).

Commands (`data=` is a folder tree `<root>/{train,val}/<class>/<image>` (labels = sorted class folder names) or
the ArrayRecord shards `cvt-jax prepare` wrote of one):
  cvt-jax train --config finetune:init=cvt13_224.npz,data=~/flowers,classes=102 \
      --workdir out/ft_flowers
  cvt-jax train --workdir out/ft_pets --config.data.data_dir=~/tensorflow_datasets \
      --config finetune:init=CvT-13-224x224-IN-1k.pth,tfds=oxford_iiit_pet,classes=37,res=384
  ... finetune:...,opt=adamw,lr=1e-4        # AdamW (lr given at batch 512, decay `wd`)

`init` is any checkpoint `init_from` reads (a converted .npz, a workdir, or a PyTorch .pth/.bin/.safetensors
converted on the fly); the model is its architecture (a named variant or a custom width such as the demo's;
`variant=cvt-21` checks it instead). Its head is replaced by a fresh one when `classes` differs from its class
count. `warmup` is clamped below `epochs`, so `epochs=1` trains without warm-up. `res=384` fine-tunes at 384
from 224 weights with no surgery: CvT has no position embeddings. The fine-tuned workdir evaluates and
predicts with its own class names:
  cvt-jax eval --config finetune:data=~/flowers,classes=102 --checkpoint out/ft_flowers
  cvt-jax predict --checkpoint out/ft_flowers photo.jpg

Recipe (paper section 4.1, following ViT): SGD momentum 0.9, global batch 512, no weight decay, cosine decay
to 0 after a short linear warm-up, lr 0.01 at batch 512 (scaled linearly with `batch`); augmentation is the
random-resized crop and flip only (no RandAugment, erasing, mixup/cutmix or label smoothing).
`python examples/finetune_digits.py` compares fine-tuning with training from scratch offline
(docs/using_checkpoints.md has its figures).
"""

import os

from etils import epath

from cvt_jax.configs import common
from cvt_jax.data import records


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, init="", variant="", classes=0, data="", tfds="", res=224, batch=512,
                          epochs=10, warmup=1, opt="sgd", lr=0.01, wd=0.0, eval_every=1)
  config = common.get_config(args.variant, args.res, weight_decay=args.wd, global_batch_size=args.batch)
  config.init_from = args.init
  config.model.num_classes = args.classes
  if args.tfds:
    config.data.source, config.data.name = "tfds", args.tfds
  else:  # a folder tree or what `cvt-jax prepare` wrote; without `data=` validation asks for data.data_dir
    prepared = bool(args.data) and (epath.Path(os.path.expanduser(args.data)) / records.INFO_FILE).exists()
    config.data.source, config.data.name = "array_record" if prepared else "folder", ""
    config.data.data_dir = args.data or None

  config.optim.name = args.opt
  config.optim.lr = args.lr
  config.optim.lr_batch_size = 512
  config.schedule.warmup_epochs = min(args.warmup, args.epochs - 1)
  config.schedule.warmup_lr = 0.0
  config.schedule.min_lr = 0.0
  config.schedule.per_step = True  # short runs: a smooth cosine, not one lr per epoch

  common.crop_and_flip_only(config)
  config.augment.label_smoothing = 0.0

  config.num_epochs = args.epochs
  config.eval_every_epochs = args.eval_every
  config.log_every_steps = 20
  config.eval_batch_size = 256
  return common.finalize(config)
