"""`cvt-jax export`: an artefact that plain `jax` serves with the in-process model's logits, or nothing at all.

The reloading process is a venv made of exactly what examples/serve.py (and docs/serving.md) tell a serving
host to install (tests/serving_venv.py); it runs serve.py's own functions and must never import cvt_jax or
flax.
"""

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest
import safetensors.numpy
import serving_venv
from PIL import Image
from test_bad_inputs import readonly  # noqa: F401  (a fixture: a folder nobody can write to)
from test_torch_weights import synthetic_official

from cvt_jax import export
from cvt_jax import model as model_lib
from cvt_jax import weights
from cvt_jax.cli import main as cli
from cvt_jax.data import preprocess

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = serving_venv.EXAMPLES
TINY = os.path.join(HERE, "fixtures", "tiny", "hf", "model.safetensors")  # dims 8/16/24, 10 classes
CLASSES = tuple(f"thing {i}" for i in range(10))
SIZE = 64
# (width, height): landscape, portrait thinner than the crop, square, odd sizes.
IMAGE_SIZES = [(500, 375), (91, 37), (64, 64), (300, 301), (37, 200), (120, 80), (256, 255), (71, 71)]

# Runs in a fresh interpreter: an example server's (examples/serve.py's or serve_onnx.py's) loader and eval
# transform, the logits at several batch sizes (the last one all images), its printed top-5, and which of
# cvt_jax, flax, jax and torch it imported.
RELOAD = """
import importlib, json, sys
import numpy as np
example, out_dir, result, examples, batches, *paths = sys.argv[1:]
sys.path.insert(0, examples)
serve = importlib.import_module(example)
forward, signature, names = serve.load(out_dir)
images = np.stack([serve.eval_image(p, signature["eval_transform"]) for p in paths])
np.savez(result, **{b: np.asarray(forward(images[:int(b)])) for b in batches.split(",")})
serve.top5(forward, signature, names, paths)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"cvt_jax", "flax", "jax", "torch"})))
"""


@dataclasses.dataclass
class Reloaded:
  logits: dict[int, np.ndarray]  # batch size -> logits of the first `batch` images
  top5: str  # the example's output
  imported: list[str]  # of cvt_jax, flax, jax and torch


def start_reload(out_dir, paths, batches, tmp_path, example: str, python: str) -> Callable[[], Reloaded]:
  """Starts RELOAD with examples/`example`.py on `out_dir` in `python` and returns a function that waits for
  its `Reloaded`."""
  result = str(tmp_path / f"reloaded-{os.path.basename(out_dir)}.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  env.pop("PYTHONPATH", None)  # the serving host has none of this checkout
  proc = subprocess.Popen([python, "-c", RELOAD, example, str(out_dir), result, EXAMPLES,
                           ",".join(map(str, batches)), *paths], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  def wait() -> Reloaded:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    *top5, imported = out.splitlines()
    with np.load(result) as f:
      return Reloaded({int(b): f[b] for b in f.files}, "\n".join(top5) + "\n", json.loads(imported))
  return wait


def reference_logits(source: str, paths, size: int, dtype: str = "float32") -> np.ndarray:
  """The in-process model on cvt_jax's own eval transform of `paths`."""
  checkpoint = weights.load(source)
  model = checkpoint.model(dtype=model_lib.compute_dtype(dtype))
  images = np.stack([preprocess.eval_image(p, size) for p in paths])
  return np.asarray(jax.jit(lambda v, x: model.apply(v, model_lib.normalize(x)))(checkpoint.variables, images))


def assert_close(logits, reference, tolerance):
  """max |logits - reference| <= tolerance x max |reference|."""
  scale = float(np.abs(reference).max())
  assert float(np.abs(logits - reference).max()) <= tolerance * scale, (
      np.abs(logits - reference).max(), scale)


def cvt_jax(capsys, *args) -> tuple[int, str, str]:
  """`cvt-jax ARGS` in this process: (exit status, stdout, stderr)."""
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", *map(str, args)])
  captured = capsys.readouterr()
  return exit_.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("jpegs")
  rng = np.random.default_rng(0)
  paths = []
  for i, (w, h) in enumerate(IMAGE_SIZES):
    # Smooth gradients plus noise: something for the bicubic filter to interpolate.
    y, x = np.mgrid[:h, :w]
    image = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + rng.integers(0, 64, (h, w, 3))
    paths.append(str(folder / f"{i}.jpg"))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
  return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny fixture converted, with class names beside it (-> classes.txt)."""
  npz = str(tmp_path_factory.mktemp("tiny") / "tiny.npz")
  weights.save(dataclasses.replace(weights.load(TINY), class_names=CLASSES), npz)
  return npz


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
  """The tiny checkpoint exported with three lowerings in one artefact."""
  out_dir = str(tmp_path_factory.mktemp("exports") / "tiny")
  checkpoint = weights.load(tiny)
  export.save(export.export(checkpoint, SIZE, platforms=("cpu", "cuda", "tpu")), checkpoint, out_dir, "float32")
  return out_dir


@pytest.fixture(scope="module")
def serving_python():
  """A venv with `pip install jax flatbuffers numpy pillow` (serve.INSTALL) and nothing else."""
  return serving_venv.python_for("serve")


@pytest.fixture(scope="module")
def reloaded(tiny, tiny_export, jpegs, serving_python, tmp_path_factory) -> tuple[Reloaded, np.ndarray]:
  """The tiny artefact reloaded in a fresh process at batch 1, 3 and 8, and the in-process model's logits."""
  wait = start_reload(tiny_export, jpegs, (1, 3, 8), tmp_path_factory.mktemp("reload"), "serve", serving_python)
  reference = reference_logits(tiny, jpegs, SIZE)  # while the other process compiles
  return wait(), reference


def test_the_artefact_reloads_in_plain_jax_at_any_batch_size_with_the_models_logits(reloaded):
  got, reference = reloaded
  assert got.imported == ["jax"]
  for batch, logits in got.logits.items():
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    # Measured 5.1e-7: XLA folds the baked-in constants at compile time (bit-identical to the in-process
    # model compiled with its weights as constants).
    assert_close(logits, reference[:batch], 1e-6)


def test_the_artefact_states_its_contract(tiny_export):
  assert sorted(os.listdir(tiny_export)) == ["classes.txt", "model.stablehlo", "signature.json"]
  signature = json.loads(open(os.path.join(tiny_export, "signature.json")).read())
  assert signature["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["b", SIZE, SIZE, 3],
                                  "layout": "NHWC, RGB, 0-255, after eval_transform; normalised inside the model"}]
  assert signature["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["b", 10]}]
  assert signature["eval_transform"]["resize"] == 73 and signature["eval_transform"]["center_crop"] == SIZE
  assert (signature["num_classes"], signature["dtype"], signature["platforms"]) == (10, "float32",
                                                                                   ["cpu", "cuda", "tpu"])
  assert signature["jax_version"] == jax.__version__ and signature["calling_convention_version"] >= 9
  assert open(os.path.join(tiny_export, "classes.txt")).read().splitlines() == list(CLASSES)
  exported = jax.export.deserialize(bytearray(open(os.path.join(tiny_export, "model.stablehlo"), "rb").read()))
  assert exported.platforms == ("cpu", "cuda", "tpu") and exported.nr_devices == 1
  assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])


@pytest.mark.parametrize("size", [SIZE, 224, 383, 384])
def test_serve_py_crops_as_the_official_eval_transform(jpegs, size):
  serve = serving_venv.example("serve")
  for path in jpegs:
    np.testing.assert_array_equal(serve.eval_image(path, export.eval_transform(size)),
                                  preprocess.eval_image(path, size), path)


def test_predict_exported_and_serve_py_give_the_top5_of_predict_checkpoint(tiny, tiny_export, reloaded, jpegs,
                                                                           capsys):
  status, from_checkpoint, _ = cvt_jax(capsys, "predict", "--checkpoint", tiny, "--image_size", SIZE, *jpegs)
  assert status == 0
  status, from_export, _ = cvt_jax(capsys, "predict", "--exported", tiny_export, "--batch_size", 3, *jpegs)
  assert status == 0
  top5 = lambda text: [line.split("%", 1)[-1] for line in text.splitlines()]  # label and name, no percentage
  assert top5(from_export) == top5(from_checkpoint) and "thing " in from_checkpoint
  assert top5(reloaded[0].top5) == top5(from_checkpoint)
  status, _, err = cvt_jax(capsys, "predict", "--exported", tiny_export, "--image_size", 224, *jpegs)
  assert status == 2 and "--image_size: fixed when the model was exported" in err


def test_bfloat16_export_is_the_bfloat16_model(tiny, reloaded, jpegs, tmp_path, capsys):
  out_dir = tmp_path / "bf16"
  assert cvt_jax(capsys, "export", tiny, out_dir, "--image_size", SIZE, "--dtype", "bfloat16")[0] == 0
  exported = export.ExportedModel(out_dir).exported
  images = np.stack([preprocess.eval_image(p, SIZE) for p in jpegs])
  logits = np.asarray(exported.call(images))
  assert logits.dtype == np.float32
  # The in-process bf16 model is another compilation (weights as arguments, not constants: other fusions,
  # so other points where a bf16 intermediate is rounded): a few roundings of 2^-8 of the largest logit.
  assert_close(logits, reference_logits(tiny, jpegs, SIZE, "bfloat16"), 2e-2)
  # Against fp32 (bf16 keeps 8 significant bits: each rounding is off by up to 2e-3 relative, and the
  # roundings of every block add up in the logits): measured 2.4e-2 of the largest logit on this model and
  # 1.3e-2 on a real-width CvT-13 with random weights (bench/README.md).
  assert_close(logits, reloaded[1], 3e-2)


def real_width_cvt13(path: str, classes: int = 1000) -> None:
  """A CvT-13 in the official PyTorch layout with random weights, scaled so that activations stay O(1)."""
  rng = np.random.default_rng(0)
  tensors = {}
  for key, zeros in synthetic_official((64, 192, 384), (1, 2, 10), classes).items():
    if zeros.dtype != np.float32:  # num_batches_tracked
      tensors[key] = zeros
    elif key.endswith(("running_var", "norm1.weight", "norm2.weight", "norm.weight", "bn.weight")):
      tensors[key] = rng.uniform(0.5, 1.5, zeros.shape).astype(np.float32)
    elif zeros.ndim >= 2:
      fan_in = int(np.prod(zeros.shape[1:]))
      tensors[key] = (rng.standard_normal(zeros.shape) / np.sqrt(fan_in)).astype(np.float32)
    else:
      tensors[key] = (0.1 * rng.standard_normal(zeros.shape)).astype(np.float32)
  safetensors.numpy.save_file(tensors, path)


@pytest.mark.slow
def test_a_converted_real_width_cvt13_serves_the_logits_of_the_in_process_model(jpegs, serving_python, tmp_path,
                                                                               capsys):
  pth = str(tmp_path / "CvT-13-224x224-IN-1k.safetensors")
  real_width_cvt13(pth)
  out_dir = tmp_path / "cvt13"
  status, out, _ = cvt_jax(capsys, "export", pth, out_dir)
  assert status == 0 and "cvt-13 (dims (64, 192, 384)" in out and "at 224x224 in float32 for cpu" in out
  paths = jpegs[:3]
  wait = start_reload(out_dir, paths, (3,), tmp_path, "serve", serving_python)
  reference = reference_logits(pth, paths, 224)
  reloaded = wait()
  assert reloaded.imported == ["jax"]
  assert_close(reloaded.logits[3], reference, 1e-6)
  assert "tench, Tinca tinca" in open(out_dir / "classes.txt").read()  # a 1000-class head: ImageNet names


BAD_INPUTS = [
    ("no such checkpoint", ["{tmp}/none.npz", "{out}"], 1, "none.npz does not exist"),
    ("not a checkpoint", ["{tmp}/notes.npz", "{out}"], 1, "notes.npz: unreadable weights file (not a NumPy"),
    ("resolution below 32", ["{tiny}", "{out}", "--image_size", "16"], 2, "--image_size=16"),
    ("unknown platform", ["{tiny}", "{out}", "--platforms", "cpu,rocm"], 2, "comma-separated list of cpu"),
    ("out dir not writable", ["{tiny}", "{readonly}/served"], 2, "is not writable"),
    ("out dir holds other files", ["{tiny}", "{tmp}"], 2, "exists and is not an exported model"),
    ("out dir is a file", ["{tiny}", "{tmp}/notes.npz"], 2, "exists and is not an exported model"),
    ("one argument", ["{tiny}"], 2, "expected CHECKPOINT and OUT_DIR"),
]


@pytest.mark.parametrize("args,status,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_nothing(args, status, message, tiny, readonly, tmp_path, capsys):
  (tmp_path / "notes.npz").write_text("a user's notes")
  before = sorted(os.listdir(tmp_path))
  paths = {"tmp": tmp_path, "out": tmp_path / "served", "tiny": tiny, "readonly": readonly}
  code, _, err = cvt_jax(capsys, "export", *(a.format(**paths) for a in args))
  lines = err.strip().splitlines()
  assert code == status and len(lines) == 1 and message in lines[0], err
  assert "unsafe" not in err and "pickle" not in err
  assert sorted(os.listdir(tmp_path)) == before and os.listdir(readonly) == []


@pytest.fixture(scope="module")
def accelerators_only(tiny, tmp_path_factory):
  """(checkpoint, `jax.export.Exported` for cuda and tpu, its artefact folder)."""
  checkpoint = weights.load(tiny)
  exported = export.export(checkpoint, SIZE, platforms=("cuda", "tpu"))
  out_dir = str(tmp_path_factory.mktemp("accelerators") / "served")
  export.save(exported, checkpoint, out_dir, "float32")
  return checkpoint, exported, out_dir


def test_a_failure_while_writing_leaves_no_partial_artefact_and_an_old_one_intact(accelerators_only,
                                                                                 monkeypatch):
  checkpoint, exported, out_dir = accelerators_only
  files = lambda: {name: open(os.path.join(out_dir, name), "rb").read() for name in os.listdir(out_dir)}
  old, parent = files(), os.path.dirname(out_dir)

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export, "signature", fail)  # after model.stablehlo was written
  for target in (out_dir, os.path.join(parent, "new")):
    with pytest.raises(OSError, match="No space left"):
      export.save(exported, checkpoint, target, "float32")
  assert os.listdir(parent) == ["served"] and files() == old
  monkeypatch.undo()
  export.save(exported, checkpoint, out_dir, "float32")  # an earlier artefact is replaced
  assert os.listdir(parent) == ["served"] and files() == old


def test_predict_refuses_an_artefact_for_other_platforms_in_one_line(accelerators_only, jpegs, capsys):
  _, _, out_dir = accelerators_only
  code, _, err = cvt_jax(capsys, "predict", "--exported", out_dir, jpegs[0])
  assert code == 1 and err.strip().endswith("was exported for cuda, tpu, not for this host's cpu "
                                            "(cvt-jax export --platforms)")
  code, _, err = cvt_jax(capsys, "predict", "--exported", os.path.dirname(out_dir), jpegs[0])
  assert code == 1 and "no signature.json; not an exported model" in err


def test_an_export_into_an_earlier_one_that_holds_a_users_file_names_it(tiny, tmp_path, capsys):
  out_dir = tmp_path / "served"
  assert cvt_jax(capsys, "export", tiny, out_dir, "--image_size", SIZE)[0] == 0
  (out_dir / "notes.txt").write_text("mine")
  before = sorted(os.listdir(out_dir))
  code, _, err = cvt_jax(capsys, "export", tiny, out_dir, "--image_size", SIZE)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert f"output {out_dir} is an earlier export that also holds notes.txt; move them or name a new folder" in err
  assert sorted(os.listdir(out_dir)) == before and (out_dir / "notes.txt").read_text() == "mine"


def damaged_copy(out_dir, tmp_path, name: str, damage) -> str:
  """A copy of the artefact `out_dir` whose file `name` is `damage(its bytes)` (None: deleted)."""
  copy = tmp_path / "damaged"
  copy.mkdir()
  for file in os.listdir(out_dir):
    data = open(os.path.join(out_dir, file), "rb").read()
    if file == name:
      data = damage(data)
    if data is not None:
      (copy / file).write_bytes(data)
  return str(copy)


PREDICT_EXPORTED_ERRORS = [
    ("missing folder", None, None, "{path}/none does not exist"),
    ("damaged signature", "signature.json", lambda d: d[:40], "{path}/signature.json: damaged (Unterminated"),
    ("signature not ours", "signature.json", lambda d: b"[1, 2]", "{path}/signature.json: format None, this"),
    ("truncated model", "model.stablehlo", lambda d: d[:len(d) // 2],
     "{path}/model.stablehlo: damaged or truncated, export the model again"),
    ("model deleted", "model.stablehlo", lambda d: None, "{path}: no model.stablehlo; export the model again"),
]


@pytest.mark.parametrize("name,damage,message", [c[1:] for c in PREDICT_EXPORTED_ERRORS],
                         ids=[c[0] for c in PREDICT_EXPORTED_ERRORS])
def test_predict_names_what_is_wrong_with_an_exported_folder(name, damage, message, tiny_export, jpegs, tmp_path,
                                                             capsys):
  path = damaged_copy(tiny_export, tmp_path, name, damage) if name else str(tmp_path)
  code, _, err = cvt_jax(capsys, "predict", "--exported", os.path.join(path, "none") if not name else path,
                         jpegs[0])
  assert code == 1 and len(err.strip().splitlines()) == 1 and message.format(path=path) in err, err
  assert "unexpected" not in err
