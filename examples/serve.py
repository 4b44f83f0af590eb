"""Classify images with a `cvt-jax export` folder and nothing but jax, numpy and PIL (no cvt_jax, no flax).

  python examples/serve.py cvt13_served cat.jpg dog.png
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image


def load(out_dir):
  """-> (uint8 images (b, S, S, 3) -> fp32 logits (b, classes), signature.json, class names)."""
  out_dir = Path(out_dir)
  exported = jax.export.deserialize(bytearray((out_dir / "model.stablehlo").read_bytes()))
  signature = json.loads((out_dir / "signature.json").read_text())
  names = [f"class {i}" for i in range(signature["num_classes"])]
  if (out_dir / "classes.txt").exists():
    names = (out_dir / "classes.txt").read_text().splitlines()
  return jax.jit(exported.call), signature, names


def eval_image(path, transform):
  """The official eval transform (torchvision's Resize + CenterCrop on a PIL image) -> uint8 (S, S, 3)."""
  img = Image.open(path).convert("RGB")
  resize, crop = transform["resize"], transform["center_crop"]
  if isinstance(resize, int):  # the shorter side, the longer one in proportion (rounded down)
    w, h = (resize * side // min(img.size) for side in img.size)
  else:
    h, w = resize
  img = img.resize((w, h), Image.Resampling.BICUBIC)
  if crop:
    left, top = round((w - crop) / 2), round((h - crop) / 2)  # ties to even, as torchvision's round()
    img = img.crop((left, top, left + crop, top + crop))
  return np.asarray(img)


def top5(forward, signature, names, paths):
  """Prints the five most probable classes of each image."""
  images = np.stack([eval_image(p, signature["eval_transform"]) for p in paths])
  probabilities = np.asarray(jax.nn.softmax(forward(images)))
  for path, p in zip(paths, probabilities):
    print(path)
    for i in np.argsort(-p, kind="stable")[:5]:
      print(f"  {100 * p[i]:6.2f}%  {i:4d}  {names[i]}")


if __name__ == "__main__":
  top5(*load(sys.argv[1]), sys.argv[2:])
