"""cvt_jax.weights (the one loader and the .npz format) and the `cvt-jax convert` command."""

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy

from cvt_jax import pth
from cvt_jax import torch_weights
from cvt_jax import trees
from cvt_jax import weights
from cvt_jax.cli import convert

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny")
OFFICIAL = os.path.join(TINY, "official.pth")
HF_BIN = os.path.join(TINY, "hf", "pytorch_model.bin")
HF_SAFETENSORS = os.path.join(TINY, "hf", "model.safetensors")
TINY_HEADS = (1, 2, 3)


@pytest.fixture(scope="module")
def converted() -> weights.Checkpoint:
  return weights.load(OFFICIAL, heads=TINY_HEADS)


def assert_same_variables(a: dict, b: dict) -> None:
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def convert_cli(*args: str) -> int:
  """`cvt-jax convert ARGS` in this process; its exit status."""
  with pytest.raises(SystemExit) as exit_:
    convert.run(["cvt-jax convert", *map(str, args)])
  return exit_.value.code


def test_round_trip_and_cli_verify(tmp_path, converted, capsys):
  dst = tmp_path / "tiny.npz"
  assert convert_cli(HF_BIN, dst, "--verify") == 0
  out = capsys.readouterr().out
  assert "classes: 10" in out and f"params:  {converted.num_params:,}" in out and "verified:" in out
  loaded = weights.load(dst)
  assert (loaded.variant, loaded.num_classes, loaded.source) == (converted.variant, 10, str(dst))
  assert_same_variables(loaded.variables, converted.variables)

  flat = trees.flatten(loaded.variables)
  flat["params/norm/scale"] = np.zeros(5, np.float32)
  with np.load(dst) as f:
    meta = f["__meta__"]
  np.savez(tmp_path / "bad.npz", __meta__=meta, **flat)
  with pytest.raises(trees.TreeMismatchError, match=r"1 mis-shaped \(params/norm/scale \(5,\) instead of "
                                                    r"\(24,\)\)"):
    weights.load(tmp_path / "bad.npz")
  (tmp_path / "w.onnx").write_bytes(b"onnx")
  with pytest.raises(weights.WeightsError, match="unknown weights format"):
    weights.load(tmp_path / "w.onnx")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.load(tmp_path / "nothing.npz")


def test_custom_architecture_is_converted_and_reported(tmp_path, capsys):
  from test_torch_weights import synthetic_official

  src, dst = tmp_path / "custom.safetensors", tmp_path / "custom.npz"
  safetensors.numpy.save_file(synthetic_official((64, 128, 192), (1, 1, 2), 5), str(src))
  assert convert_cli(src, dst) == 0
  out = capsys.readouterr().out
  assert "matches no named variant" in out and "heads (1, 2, 3)" in out and "classes: 5" in out
  assert weights.load(dst).variant.architecture == ((64, 128, 192), (1, 1, 2), (1, 2, 3))


def assert_cli_fails_cleanly(tmp_path, capsys, src, message: str, *flags: str) -> None:
  dst = tmp_path / "out" / "w.npz"
  assert convert_cli(src, dst, *flags) == 1
  err = capsys.readouterr().err
  assert message in err and str(src) in err and len(err.strip().splitlines()) == 1, err
  assert not dst.exists()
  assert not dst.parent.exists() or not os.listdir(dst.parent)  # no temp file left behind


def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys):
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(OFFICIAL, "rb").read()[:50_000])
  assert_cli_fails_cleanly(tmp_path, capsys, truncated, "truncated or corrupt")

  evil = tmp_path / "evil.pth"

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  assert_cli_fails_cleanly(tmp_path, capsys, evil,
                           f"refusing to unpickle global '{os.system.__module__}.system'")

  not_a_dict = tmp_path / "list.pth"
  with zipfile.ZipFile(not_a_dict, "w") as z:
    z.writestr("list/data.pkl", pickle.dumps([1, 2, 3], protocol=2))
  assert_cli_fails_cleanly(tmp_path, capsys, not_a_dict, "holds a list, not a state dict")

  assert_cli_fails_cleanly(tmp_path, capsys, os.path.join(FIXTURES, "legacy.pth"), "legacy")
  broken = tmp_path / "broken.safetensors"
  broken.write_bytes(open(HF_SAFETENSORS, "rb").read()[:1000])
  assert_cli_fails_cleanly(tmp_path, capsys, broken, "unreadable safetensors file")
  sd = pth.load_state_dict(OFFICIAL)
  del sd["head.bias"]
  missing = tmp_path / "missing.safetensors"
  safetensors.numpy.save_file(sd, str(missing))
  assert_cli_fails_cleanly(tmp_path, capsys, missing, "1 missing (params/head/bias (10,))", "--heads", "1,2,3")
  assert_cli_fails_cleanly(tmp_path, capsys, missing, "pass the heads per stage")


@pytest.mark.parametrize("args,message", [
    (["SRC", "w.npy"], "output w.npy: expected a .npz file name"),
    (["SRC", "DIR.npz"], "DIR.npz is a folder; give a file name"),
    (["SRC"], "expected SRC and DST"),
    (["SRC", "w.npz", "--heads", "1,2"], "expected three positive integers"),
])
def test_bad_arguments_fail_before_reading(tmp_path, capsys, args, message):
  os.makedirs(tmp_path / "DIR.npz")
  args = [str(tmp_path / a) if a in ("w.npz", "DIR.npz") else HF_SAFETENSORS if a == "SRC" else a
          for a in args]
  assert convert_cli(*args) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_save_is_atomic(tmp_path, converted, monkeypatch):
  def failing_savez(f, **arrays):
    f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(weights.np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    weights.save(converted, tmp_path / "w.npz")
  assert os.listdir(tmp_path) == []


def test_module_entry_point(tmp_path):
  dst = tmp_path / "w.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "cvt_jax.cli.convert", HF_SAFETENSORS, str(dst)], env=env,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "variant: custom (dims (8, 16, 24), depths (1, 2, 3), heads (1, 2, 3))" in run.stdout
  assert jax.tree.leaves(weights.load(dst).variables)


def write_hub_cache(root, repo: str, files: dict[str, str]) -> None:
  """The layout huggingface_hub caches a download in: blobs, a snapshot of links, refs/main."""
  folder = root / f"models--{repo.replace('/', '--')}"
  revision = "0123456789abcdef0123456789abcdef01234567"
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(revision)
  snapshot = folder / "snapshots" / revision
  snapshot.mkdir(parents=True)
  (folder / "blobs").mkdir()
  for name, source in files.items():
    blob = folder / "blobs" / f"blob-{name}"
    blob.write_bytes(open(source, "rb").read())
    os.symlink(os.path.relpath(blob, snapshot), snapshot / name)


def test_hub_names_load_offline_from_the_cache(tmp_path, monkeypatch, converted):
  write_hub_cache(tmp_path, "microsoft/cvt-tiny", {"model.safetensors": HF_SAFETENSORS,
                                                   "config.json": os.path.join(TINY, "hf", "config.json")})
  import huggingface_hub.constants  # read when huggingface_hub is imported: patched, not the environment
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  loaded = weights.load("microsoft/cvt-tiny")
  assert loaded.source == "microsoft/cvt-tiny (model.safetensors)" and loaded.num_classes == 10
  assert_same_variables(loaded.variables, converted.variables)  # heads from the cached config.json
  with pytest.raises(FileNotFoundError, match="microsoft/cvt-none: not in the Hugging Face hub cache, and "
                                              "HF_HUB_OFFLINE is set"):
    weights.load("microsoft/cvt-none")


def test_init_from_keeps_a_fresh_head_for_another_class_count(converted):
  fresh = jax.tree.map(np.zeros_like, converted.variables)
  merged = weights.init_from(converted, fresh, converted.variant, 10, log=lambda _: None)
  assert_same_variables(merged, converted.variables)
  head5 = {**fresh, "params": {**fresh["params"], "head": {"kernel": np.zeros((24, 5), np.float32),
                                                           "bias": np.zeros(5, np.float32)}}}
  merged = weights.init_from(converted, head5, converted.variant, 5, log=lambda _: None)
  assert merged["params"]["head"]["kernel"].shape == (24, 5) and not merged["params"]["head"]["kernel"].any()
  np.testing.assert_array_equal(merged["params"]["norm"]["scale"],
                                converted.variables["params"]["norm"]["scale"])
  other = torch_weights.variant_from_architecture("x", (8, 16, 24), (1, 1, 1), (1, 2, 3))
  with pytest.raises(weights.WeightsError, match="holds a custom .* but the config trains a x"):
    weights.init_from(converted, fresh, other, 10)
