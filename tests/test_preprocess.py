"""Image preprocessing against the official torchvision transforms, pixel for pixel.

The reference is microsoft/CvT's pipeline run by torchvision itself on its `pil_loader` images:
`Resize(int(size / 0.875), BICUBIC) + CenterCrop(size)` for evaluation (a squash `Resize((size, size))` at
384), `RandomResizedCrop` + flip for training (the `torchvision_transforms` fixture: torchvision's Python
transforms, unpacked by ./run.sh test). Photos: smooth gradients + noise + hard-edged shapes, JPEG quality 90.
Every source (a folder tree, ArrayRecord shards, a TFDS array_record dataset) decodes through the same PIL
calls; the tests run them all.
"""

import functools
import os
import shutil

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image, ImageDraw

from cvt_jax.data import decode
from cvt_jax.data import prepare
from cvt_jax.data import preprocess
from cvt_jax.data import sources

SIZES = (224, 384)
PHOTOS = ("rgb_500x375.jpg", "rgb_1200x900.jpg", "rgb_2048x1536.jpg", "grey_1024x768.jpg",
          "cmyk_640x640.jpg", "rgb_450x600.png")


def _photo(width: int, height: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  f = rng.uniform(1, 6, (3, 4))
  smooth = np.stack([128 + 60 * np.sin(x / width * f[c, 0] * np.pi + f[c, 1]) *
                     np.cos(y / height * f[c, 2] * np.pi + f[c, 3]) for c in range(3)], -1)
  img = Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(12):
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.2) * min(width, height)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  return np.asarray(img)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """{name: path} of the test photos."""
  root = tmp_path_factory.mktemp("photos")
  paths = {name: str(root / name) for name in PHOTOS}
  for seed, name in enumerate(("rgb_500x375.jpg", "rgb_1200x900.jpg", "rgb_2048x1536.jpg")):
    width, height = (int(v) for v in name[4:-4].split("x"))
    Image.fromarray(_photo(width, height, seed)).save(paths[name], quality=90)
  Image.fromarray(_photo(1024, 768, 3)).convert("L").save(paths["grey_1024x768.jpg"], quality=90)
  # CMYK with a black channel (PIL's own RGB -> CMYK leaves K at 0).
  cmy = 255 - _photo(640, 640, 4).astype(int)
  k = (cmy.min(-1, keepdims=True) * 0.7).astype(int)
  Image.fromarray(np.concatenate([cmy - k, k], -1).astype(np.uint8), "CMYK").save(
      paths["cmyk_640x640.jpg"], quality=90)
  Image.fromarray(_photo(450, 600, 5)).save(paths["rgb_450x600.png"])
  return paths


# ---- The reference: torchvision on PIL images. ----


@pytest.fixture(scope="module")
def T(torchvision_transforms):  # pylint: disable=invalid-name  # torchvision's own idiom
  return torchvision_transforms


def _pil_loader(path) -> Image.Image:
  """torchvision.datasets.folder.pil_loader, which ImageFolder (the official data path) uses."""
  with open(path, "rb") as f:
    return Image.open(f).convert("RGB")


def _official_eval(T, path, size: int) -> np.ndarray:
  """microsoft/CvT's test transform (`lib/dataset/transformas/build.py`)."""
  bicubic = T.InterpolationMode.BICUBIC
  transform = (T.Resize((size, size), bicubic) if size >= 384 else
               T.Compose([T.Resize(int(size / 0.875), bicubic), T.CenterCrop(size)]))
  return np.asarray(transform(_pil_loader(path)))


def _official_crop_params(T, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
  """`RandomResizedCrop.get_params` -> (i, j, h, w), drawing from torch's global generator."""
  return T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), list(scale), list(ratio))


def _official_resized_crop(T, path, box, size: int, interpolation: str) -> np.ndarray:
  """`F.resized_crop`, as `RandomResizedCrop` applies it."""
  left, top, right, lower = box
  mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
  return np.asarray(T.functional.resized_crop(_pil_loader(path), top, left, lower - top, right - left,
                                              [size, size], mode))


# ---- Evaluation ----


@pytest.mark.parametrize("size", SIZES)
def test_folder_eval_is_the_official_transform(T, photos, size):
  for name, path in photos.items():
    np.testing.assert_array_equal(preprocess.eval_image(path, size), _official_eval(T, path, size),
                                  err_msg=name)


@pytest.fixture(scope="module")
def examples(photos, tmp_path_factory):
  """source -> the photos as that source's examples: a folder tree's files, the records `cvt-jax prepare`
  wrote of it, and a TFDS array_record dataset of the same encoded files."""
  import tensorflow_datasets as tfds
  root = tmp_path_factory.mktemp("sources")
  for split in ("train", "val"):
    os.makedirs(root / "tree" / split / "photos")
    for name, path in photos.items():
      shutil.copy(path, root / "tree" / split / "photos" / name)
  prepare.prepare(str(root / "tree"), str(root / "records"), log=lambda _: None)
  names = sorted(photos)

  class CvtPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, None)), "label": tfds.features.ClassLabel(num_classes=1)}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, name in enumerate(names):
        yield i, {"image": photos[name], "label": 0}  # a path: TFDS stores the file's bytes

  CvtPhotos(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare()
  tfds_split = sources.tfds_split("cvt_photos", "validation", str(root / "tfds"))
  by_bytes = {open(path, "rb").read(): name for name, path in photos.items()}
  tfds_examples = {by_bytes[tfds_split.source[i].data]: tfds_split.source[i] for i in range(len(names))}
  record_split = sources.array_record_split(str(root / "records"), "val")
  records_examples = {os.path.basename(record_split.source[i].key): record_split.source[i]
                      for i in range(len(names))}
  folder_examples = {name: sources.Example(0, path) for name, path in photos.items()}
  return {"folder": folder_examples, "array_record": records_examples, "tfds": tfds_examples}


@pytest.mark.parametrize("source", ["folder", "array_record", "tfds"])
@pytest.mark.parametrize("size", SIZES)
def test_every_source_gives_the_official_eval_pixels(T, photos, examples, source, size):
  for name, example in examples[source].items():
    np.testing.assert_array_equal(decode.eval_pixels(example, size), _official_eval(T, photos[name], size),
                                  err_msg=name)


@pytest.mark.parametrize("source", ["folder", "array_record", "tfds"])
def test_every_source_gives_the_official_training_crops(T, photos, examples, source):
  crop = {"scale": preprocess.TRAIN_SCALE, "ratio": preprocess.TRAIN_RATIO, "interpolation": "bicubic"}
  for name, example in examples[source].items():
    seed = (1, 2, 3, len(name))
    rng = np.random.default_rng(seed)
    with Image.open(photos[name]) as img:
      box = preprocess.random_resized_crop_box(rng, *img.size)
    expected = _official_resized_crop(T, photos[name], box, 96, "bicubic")
    np.testing.assert_array_equal(decode.train_pixels(example, 96, seed, crop),
                                  expected[:, ::-1] if rng.random() < 0.5 else expected, err_msg=name)


@pytest.mark.parametrize("height,width,size,expected", [
    (375, 500, 224, ((256, 341), (16, 58))),  # 58.5 rounds to even
    (500, 375, 224, ((341, 256), (58, 16))),
    (333, 500, 224, ((256, 384), (16, 80))),
    (100, 1000, 160, ((182, 1820), (11, 830))),
    (375, 500, 384, ((384, 384), (0, 0))),
])
def test_eval_geometry(height, width, size, expected):
  assert preprocess.eval_geometry(height, width, size) == expected


# ---- Training ----


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_folder_train_is_the_official_transform(T, photos, interpolation):
  for name, path in photos.items():
    for seed in range(3):
      ours = preprocess.train_image(path, 96, np.random.default_rng(seed), interpolation=interpolation)
      rng = np.random.default_rng(seed)
      with Image.open(path) as img:
        box = preprocess.random_resized_crop_box(rng, *img.size)
      expected = _official_resized_crop(T, path, box, 96, interpolation)
      np.testing.assert_array_equal(ours, expected[:, ::-1] if rng.random() < 0.5 else expected,
                                    err_msg=f"{name} seed {seed}")


def test_draft_decode_keeps_the_crop(photos):
  """The opt-in reduced-scale JPEG decode changes pixels, not the crop."""
  path = photos["rgb_2048x1536.jpg"]
  for seed in range(4):
    exact = preprocess.train_image(path, 64, np.random.default_rng(seed)).astype(int)
    drafted = preprocess.train_image(path, 64, np.random.default_rng(seed), draft=True).astype(int)
    assert np.abs(exact - drafted).mean() < 2  # measured <= 0.65; a 40 px shift of the box gives >= 9


def _boxes_folder(width, height, n, scale, ratio):
  rng = np.random.default_rng(0)
  boxes = np.array([preprocess.random_resized_crop_box(rng, width, height, scale, ratio) for _ in range(n)])
  return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 0], boxes[:, 1]


def _boxes_official(T, width, height, n, scale, ratio):
  torch.manual_seed(0)
  params = np.array([_official_crop_params(T, width, height, scale, ratio) for _ in range(n)])
  return params[:, 3], params[:, 2], params[:, 1], params[:, 0]


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (1000, 100)])
def test_crop_law_matches_torchvision(T, width, height):
  """Two-sample KS tests of area fraction and log aspect, our sampler against torchvision's."""
  n, scale, ratio = 3000, preprocess.TRAIN_SCALE, preprocess.TRAIN_RATIO
  stats = {"area": lambda w, h: w * h / (width * height), "log aspect": lambda w, h: np.log(w / h)}
  official_w, official_h, _, _ = _boxes_official(T, width, height, n, scale, ratio)
  for sampler in (_boxes_folder,):
    w, h, left, top = sampler(width, height, n, scale, ratio)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    for name, stat in stats.items():
      result = scipy.stats.ks_2samp(stat(w, h), stat(official_w, official_h))
      assert result.pvalue > 0.01, (sampler.__name__, name, result)


@pytest.mark.parametrize("width,height,expected", [
    (1000, 100, (433, 0, 133, 100)),  # too wide: the 4:3 centre crop
    (100, 1000, (0, 433, 100, 133)),  # too tall: the 3:4 centre crop
])
def test_crop_fallback(T, width, height, expected):
  """Areas >= 90 % cannot fit a 3:4..4:3 box in these images, so every try fails."""
  scale, ratio = (0.9, 1.0), preprocess.TRAIN_RATIO
  for sampler in (_boxes_folder, functools.partial(_boxes_official, T)):
    w, h, left, top = sampler(width, height, 20, scale, ratio)
    assert set(zip(left.tolist(), top.tolist(), w.tolist(), h.tolist())) == {expected}, sampler


def test_an_undecodable_example_is_named_by_its_key_not_by_an_in_memory_stream():
  example = sources.Example(key="train/cat/notes.jpg", label=0, data=b"not an image")
  pixels, used, failed = decode.first_decodable([example], lambda e: decode.eval_pixels(e, 32))
  assert pixels is None and used == -1
  assert failed == ["train/cat/notes.jpg (UnidentifiedImageError: cannot identify image file)"]
