"""`cvt-jax export --format onnx`: a model.onnx that ONNX Runtime serves without jax with the in-process
model's logits, or nothing at all.

The reloading process is a venv made of exactly what examples/serve_onnx.py (and docs/serving.md) tell a
serving host to install (tests/serving_venv.py); it runs serve_onnx.py's own functions and must import
neither jax nor cvt_jax.
"""

import json
import os

import numpy as np
import onnx
import pytest
import serving_venv
from test_export import EXAMPLES
from test_export import SIZE
from test_export import assert_close
from test_export import cvt_jax
from test_export import jpegs  # noqa: F401  (a fixture)
from test_export import real_width_cvt13
from test_export import reference_logits
from test_export import start_reload
from test_export import tiny  # noqa: F401  (a fixture)

from cvt_jax import export
from cvt_jax import export_onnx
from cvt_jax import ops as ops_lib
from cvt_jax import weights

ROOT = os.path.dirname(EXAMPLES)


@pytest.fixture(scope="module")
def serving_python():
  """A venv with `pip install onnxruntime numpy pillow` (serve_onnx.INSTALL) and nothing else."""
  return serving_venv.python_for("serve_onnx")


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("onnx") / "tiny")
  checkpoint = weights.load(tiny)
  export_onnx.save(export_onnx.export(checkpoint, SIZE), checkpoint, out_dir, "float32")
  return out_dir


@pytest.fixture(scope="module")
def reloaded(tiny, tiny_onnx, jpegs, serving_python, tmp_path_factory):
  """The tiny model.onnx run by serve_onnx.py at batch 1, 3 and 8, and the in-process model's logits."""
  wait = start_reload(tiny_onnx, jpegs, (1, 3, 8), tmp_path_factory.mktemp("reload"), "serve_onnx", serving_python)
  reference = reference_logits(tiny, jpegs, SIZE)
  return wait(), reference


def test_onnx_runtime_without_jax_gives_the_models_logits_at_any_batch_size(reloaded):
  got, reference = reloaded
  assert got.imported == []
  for batch, logits in got.logits.items():
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    # Measured 6.2e-7 of the largest logit (2.18): fp32 rounding in another order (ONNX Runtime's kernels).
    assert_close(logits, reference[:batch], 1e-5)


def test_the_onnx_artefact_states_its_contract(tiny_onnx):
  assert sorted(os.listdir(tiny_onnx)) == ["classes.txt", "model.onnx", "signature.json"]
  signature = json.loads(open(os.path.join(tiny_onnx, "signature.json")).read())
  assert signature["model_file"] == "model.onnx" and signature["opset"] == export_onnx.OPSET
  assert signature["inputs"][0]["shape"] == ["b", SIZE, SIZE, 3] and signature["outputs"][0]["shape"] == ["b", 10]
  assert signature["eval_transform"] == export.eval_transform(SIZE) and signature["dtype"] == "float32"
  model = onnx.load(os.path.join(tiny_onnx, "model.onnx"))
  onnx.checker.check_model(model, full_check=True)
  (image,), (logits,) = model.graph.input, model.graph.output
  assert (image.name, image.type.tensor_type.elem_type) == ("images", onnx.TensorProto.UINT8)
  assert (logits.name, logits.type.tensor_type.elem_type) == ("logits", onnx.TensorProto.FLOAT)
  assert image.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
  # Attention as MatMuls (ONNX Runtime's Einsum ran at less than half their speed) and each LayerNorm one
  # node (not a dozen unfused ones): docs/serving.md.
  ops = [node.op_type for node in model.graph.node]
  assert "Einsum" not in ops and ops.count("LayerNormalization") == 1 + 2 * 6 + 3  # stages 1+2+3, blocks, final


def test_the_onnx_kernels_attention_is_the_plain_one():
  q, k, v = np.random.default_rng(0).standard_normal((3, 2, 50, 3, 8), np.float32)
  np.testing.assert_allclose(ops_lib.attention(q, k, v, 0.1, "onnx"), ops_lib.attention(q, k, v, 0.1, "plain"),
                             rtol=1e-6, atol=1e-6)


def test_predict_exported_onnx_and_serve_onnx_give_the_top5_of_predict_checkpoint(tiny, tiny_onnx, reloaded,
                                                                                   jpegs, capsys):
  status, from_checkpoint, _ = cvt_jax(capsys, "predict", "--checkpoint", tiny, "--image_size", SIZE, *jpegs)
  assert status == 0
  status, from_onnx, _ = cvt_jax(capsys, "predict", "--exported", tiny_onnx, "--batch_size", 3, *jpegs)
  assert status == 0
  top5 = lambda text: [line.split("%", 1)[-1] for line in text.splitlines()]
  assert top5(from_onnx) == top5(from_checkpoint) and "thing " in from_checkpoint
  assert top5(reloaded[0].top5) == top5(from_checkpoint)


def test_the_docs_tell_a_serving_host_what_the_tested_venvs_hold():
  text = open(os.path.join(ROOT, "docs", "serving.md")).read()
  for name in ("serve", "serve_onnx"):
    assert serving_venv.example(name).INSTALL in text


@pytest.mark.slow
def test_a_real_width_cvt13_in_onnx_runtime_gives_the_in_process_logits(jpegs, serving_python, tmp_path, capsys):
  pth = str(tmp_path / "CvT-13-224x224-IN-1k.safetensors")
  real_width_cvt13(pth)
  out_dir = tmp_path / "cvt13"
  status, out, _ = cvt_jax(capsys, "export", pth, out_dir, "--format", "onnx")
  assert status == 0 and "at 224x224 in float32 for ONNX" in out
  wait = start_reload(out_dir, jpegs, (1, 3, 8), tmp_path, "serve_onnx", serving_python)
  reference = reference_logits(pth, jpegs, 224)
  reloaded = wait()
  assert reloaded.imported == []
  for batch, logits in reloaded.logits.items():
    # Measured 1.1e-6 of the largest logit (random weights, max |logit| 3.74).
    assert_close(logits, reference[:batch], 1e-5)


BAD_INPUTS = [
    ("bfloat16", ["--dtype", "bfloat16"], 2, "--dtype bfloat16: --format onnx exports float32"),
    ("platforms", ["--platforms", "cpu"], 2, "--platforms: lowerings of the StableHLO format"),
    ("unknown format", ["--format", "tflite"], 2, "--format"),
]


@pytest.mark.parametrize("args,status,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_onnx_options_that_cannot_be_served_are_one_line_and_leave_nothing(args, status, message, tiny, tmp_path,
                                                                           capsys):
  args = args if "--format" in args else ["--format", "onnx", *args]
  code, _, err = cvt_jax(capsys, "export", tiny, tmp_path / "served", *args)
  assert code == status and len(err.strip().splitlines()) == 1 and message in err, err
  assert os.listdir(tmp_path) == []


def test_a_model_jax2onnx_cannot_convert_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
  import jax2onnx  # pylint: disable=import-outside-toplevel

  def fail(*args, **kwargs):
    raise NotImplementedError("No ONNX handler for primitive 'erf_inv'\nmore lines")

  monkeypatch.setattr(jax2onnx, "to_onnx", fail)
  code, _, err = cvt_jax(capsys, "export", tiny, tmp_path / "served", "--format", "onnx", "--image_size", SIZE)
  assert code == 1 and len(err.strip().splitlines()) == 1, err
  assert "jax2onnx 0.13.0 cannot convert" in err and "No ONNX handler for primitive 'erf_inv'" in err
  assert os.listdir(tmp_path) == []


def test_predict_names_a_damaged_model_onnx(tiny_onnx, jpegs, tmp_path, capsys):
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  for name in os.listdir(tiny_onnx):
    data = open(os.path.join(tiny_onnx, name), "rb").read()
    (damaged / name).write_bytes(data[:len(data) // 2] if name == "model.onnx" else data)
  code, _, err = cvt_jax(capsys, "predict", "--exported", damaged, jpegs[0])
  assert code == 1 and len(err.strip().splitlines()) == 1, err
  assert f"{damaged}/model.onnx: damaged or truncated, export the model again" in err
