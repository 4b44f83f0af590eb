"""What examples/serve.py and examples/serve_onnx.py share: numpy and PIL only (neither jax nor onnxruntime)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_artefact(out_dir):
  """-> (signature.json, class names) of a `cvt-jax export` folder."""
  out_dir = Path(out_dir)
  signature = json.loads((out_dir / "signature.json").read_text())
  names = [f"class {i}" for i in range(signature["num_classes"])]
  if (out_dir / "classes.txt").exists():
    names = (out_dir / "classes.txt").read_text().splitlines()
  return signature, names


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
  """Prints the five most probable classes of each image; `forward`: uint8 images -> logits."""
  images = np.stack([eval_image(p, signature["eval_transform"]) for p in paths])
  logits = np.asarray(forward(images), np.float32)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probabilities = e / e.sum(axis=-1, keepdims=True)
  for path, p in zip(paths, probabilities):
    print(path)
    for i in np.argsort(-p, kind="stable")[:5]:
      print(f"  {100 * p[i]:6.2f}%  {i:4d}  {names[i]}")
