"""The shared base of every cvt_jax training config: the official CvT ImageNet recipe.

Variant configs (`cvt13.py`, `cvt21.py`, `cvtw24.py`, `demo.py`, `finetune.py`) call `get_config()` and
override a few fields. A config file's `:arg` string (`cvt13:res=384,batch=1024`) is parsed by `parse_arg`
against typed defaults, so a misspelt key fails before any work starts.

LR scaling rule (linear, as the official code): lr = optim.lr * global_batch_size / optim.lr_batch_size,
i.e. 2e-3 at a global batch of 2048 (9.77e-7 per image).
"""

from __future__ import annotations

import ml_collections

from cvt_jax.data import augment
from cvt_jax.data import preprocess

# The official yaml recipe (microsoft/CvT experiments/imagenet/cvt/*.yaml).
OFFICIAL_BATCH = 2048
OFFICIAL_LR = 2e-3


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` against `defaults`, coercing each value to its default's type.

  Args:
    arg: the text after ':' in `--config configs/x.py:res=384`; None or '' keeps every default.
    **defaults: the accepted keys and their default values (bool, int, float or str).

  Returns:
    A locked ConfigDict of the defaults with the given values applied.

  Raises:
    ValueError: on an unknown key, a missing '=', or a value that does not parse as its default's type.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"Config arg {item!r} is not key=value (in {arg!r}).")
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r} in {arg!r}; known: {sorted(defaults)}.")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        values[key] = text.lower() in ("true", "1")
      else:
        values[key] = kind(text)
    except ValueError:
      raise ValueError(f"Config arg {key}={text!r} is not a valid {kind.__name__}.") from None
  return ml_collections.ConfigDict(values)


def get_config(variant: str = "cvt-13", image_size: int = 224, weight_decay: float = 0.05,
               global_batch_size: int = OFFICIAL_BATCH) -> ml_collections.ConfigDict:
  """The official ImageNet-1k recipe for `variant` at `image_size`."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.variant = variant
  config.model.num_classes = 1000
  # 'auto' = bfloat16 compute on GPU/TPU, float32 on CPU; params, norms and the loss stay fp32.
  config.model.dtype = "auto"
  # Evaluation computes in fp32 like the official test(); 'bfloat16' is faster on GPU/TPU (README: its cost).
  config.model.eval_dtype = "float32"
  config.model.drop_path_rate = ml_collections.config_dict.placeholder(float)  # None: the variant's.
  config.model.kernels = "auto"  # cvt_jax.ops: 'cpu' on CPU, 'tpu' (fused attention) on TPU, 'plain' on GPU
  config.model.remat = "none"  # 'block' or 'dots': recompute each block in the backward pass (less memory)
  config.model.scan_blocks = False  # one nn.scan loop per stage: XLA compiles one block each (compile time)
  # A custom width (e.g. the demo's narrow CvT): set all three; `variant` then only names it.
  config.model.dims = ml_collections.config_dict.placeholder(tuple)
  config.model.depths = ml_collections.config_dict.placeholder(tuple)
  config.model.heads = ml_collections.config_dict.placeholder(tuple)

  config.data = ml_collections.ConfigDict()
  # 'tfds' (a TFDS dataset prepared as array_record), 'array_record' (shards written by `cvt-jax prepare`)
  # or 'folder' (<data_dir>/train/<class>/*, <data_dir>/val/<class>/*).
  config.data.source = "tfds"
  config.data.name = "imagenet2012"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.train_split = "train"
  # None: "val" (folder), "validation" (tfds), whichever of the two a prepared dataset has.
  config.data.eval_split = ml_collections.config_dict.placeholder(str)
  config.data.image_size = image_size
  # Decode processes per host (grain workers); None: one per core; 0: threads of the training process.
  config.data.num_workers = ml_collections.config_dict.placeholder(int)
  # Random-resized crop + flip on the host (cvt_jax.data.preprocess), torchvision's sampling: area fraction
  # in crop_scale, log-uniform aspect in crop_ratio, then resized with `interpolation` (timm's --scale,
  # --ratio, --interpolation). Fine-tuning on small or low-resolution data often wants a milder crop_scale.
  config.data.crop_scale = preprocess.TRAIN_SCALE
  config.data.crop_ratio = preprocess.TRAIN_RATIO
  config.data.interpolation = "bicubic"
  config.data.repeated_augmentation = 1  # >1: DeiT's repeated-augmentation sampler (CvT-21 @224 yaml: 3)
  # Decode large JPEGs at a reduced DCT scale when training: faster on large photos, none at ImageNet's
  # typical 500x375 (bench/README.md), and the pixels differ slightly from the official pipeline's.
  config.data.reduced_jpeg_decode = False

  # RandAugment rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8 / cutmix 1.0 / switch 0.5, smoothing 0.1.
  config.augment = augment.default_config()

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"  # or "sgd" (finetune)
  config.optim.lr = OFFICIAL_LR  # at a global batch of `lr_batch_size`; scaled linearly to the real one.
  config.optim.lr_batch_size = OFFICIAL_BATCH
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = weight_decay
  config.optim.momentum = 0.9  # sgd only
  config.optim.grad_accum_steps = 1  # >1: average the gradients of this many micro-batches (less memory)

  config.schedule = ml_collections.ConfigDict()
  config.schedule.warmup_epochs = 5
  config.schedule.warmup_lr = 1e-6
  config.schedule.min_lr = 1e-5
  config.schedule.per_step = False  # False: constant within an epoch, as timm steps it once per epoch.

  config.num_epochs = 300
  config.global_batch_size = global_batch_size
  config.eval_batch_size = 1024
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  config.init_from = ""  # any checkpoint `cvt_jax.weights.load` reads (new head if the classes differ)
  # Parameters and AdamW moments split over the devices (FSDP / ZeRO-3) instead of replicated.
  config.fsdp = False
  config.jax_distributed = False  # call jax.distributed.initialize() (multi-host GPU/TPU)
  config.compilation_cache_dir = ""  # a persistent XLA compilation cache (local or gs://): faster restarts
  config.profile_steps = 0  # > 0: a jax.profiler trace of this many steps into <workdir>/profile
  return config


def crop_and_flip_only(config: ml_collections.ConfigDict) -> None:
  """Turns off every augmentation after the host's crop and flip (RandAugment, erasing, mixup, cutmix)."""
  config.augment.randaugment = False
  config.augment.erasing_prob = 0.0
  config.augment.mixup_alpha = 0.0
  config.augment.cutmix_alpha = 0.0


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config so that `--config.x=...` with an unknown key fails instead of being ignored."""
  config.lock()
  return config
