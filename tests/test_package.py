"""`pip install` of a wheel built from this checkout gives a working `cvt-jax` anywhere; requirements.txt
pins what pyproject.toml asks for."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, cwd: str, timeout: int = 900) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  result = subprocess.run(args, cwd=cwd, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
  return result


def test_a_wheel_installs_into_a_fresh_venv_and_runs_from_another_folder(tmp_path):
  source, wheels, venv, elsewhere = (tmp_path / name for name in ("source", "wheels", "venv", "elsewhere"))
  elsewhere.mkdir()
  # The checkout's tracked files (setuptools writes build/ beside its input, and nothing else may count).
  files = run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
  for name in filter(None, files):
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(os.path.dirname(source / name), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), source / name)
  run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(source),
      cwd=str(tmp_path))
  (wheel,) = wheels.glob("cvt_jax-*.whl")
  # The library and its commands only: the benchmark, the PyTorch models and the examples stay in the checkout.
  packaged = zipfile.ZipFile(wheel).namelist()
  assert all(name.startswith(("cvt_jax/", "cvt_jax-")) for name in packaged), packaged
  assert not [name for name in packaged if "torch_models" in name or "bench" in name], packaged
  # The dependencies come from this environment, behind the new venv's own site-packages (resolving them is
  # pip's job; the pins are tested below): what is tested is the wheel's files, package data and script.
  run(sys.executable, "-m", "venv", str(venv), cwd=str(tmp_path))
  (site,) = venv.glob("lib/python*/site-packages")
  parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (site / "dependencies.pth").write_text("\n".join(sorted(parent)))
  run(str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), cwd=str(tmp_path))

  summary = run(str(venv / "bin" / "cvt-jax"), "summary", "cvt-13", cwd=str(elsewhere))
  assert "| cvt-13 | 224x224 | 19,997,480 | 4.566 |" in summary.stdout
  # The packaged configs and class names.
  check = run(str(venv / "bin" / "python"), "-c",
              "import cvt_jax; from cvt_jax.configs import cvt13; from cvt_jax.data import labels;"
              "assert cvt13.get_config().model.variant == 'cvt-13';"
              "assert labels.imagenet_classes()[0][0] == 'n01440764';"
              "print(cvt_jax.__file__)", cwd=str(elsewhere))
  assert check.stdout.strip().startswith(str(venv))
  help_text = run(str(venv / "bin" / "cvt-jax"), "train", "--help", cwd=str(elsewhere)).stdout
  assert "configs (--config NAME[:arg=value,...] or a path): cvt13, cvt21, cvtw24, demo, finetune" in help_text


def test_requirements_pin_every_dependency_within_its_range():
  """requirements.txt (`./run.sh lock`: the tested environment) pins every dependency of pyproject.toml and
  of the extras `./run.sh test` installs, each at a version its range admits."""
  import tomllib  # pylint: disable=g-import-not-at-top

  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(ROOT, "run.sh")) as f:
    tested = next(line for line in f if line.strip().startswith("test)")).split("ensure_venv ")[1].split(";")[0]
  wanted = [Requirement(r) for r in project["dependencies"]]
  wanted += [Requirement(r) for extra in tested.split(",") for r in project["optional-dependencies"][extra]]
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        name, sep, version = line.strip().partition("==")
        assert sep, f"requirements.txt: {line.strip()!r} is not an exact pin"
        pins[canonicalize_name(name)] = version
  for requirement in wanted:
    name = canonicalize_name(requirement.name)
    assert name in pins, f"requirements.txt does not pin {requirement.name} (pyproject.toml: {requirement})"
    assert requirement.specifier.contains(pins[name], prereleases=True), \
        f"requirements.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"


def test_training_imports_and_writes_its_summaries_without_tensorflow(tmp_path):
  """A training host needs no TensorFlow or TensorBoard: the trainer imports, and its scalars land in an
  event file, with both blocked; the writer does not import the PyTorch installed here, which stays
  importable."""
  script = ("import sys; sys.modules.update(dict.fromkeys(['tensorflow', 'tensorboard', 'tensorflow_datasets']))\n"
            "from cvt_jax.train import tensorboard, trainer\n"
            f"writer = tensorboard.ScalarWriter({str(tmp_path)!r})\n"
            "writer.write_scalars(3, {'train/loss': 1.5})\n"
            "writer.close()\n"
            "assert 'torch' not in sys.modules, 'the summary writer imported PyTorch'\n"
            "import torch\n")
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  events = [name for name in os.listdir(tmp_path) if name.startswith("events.out.tfevents")]
  assert len(events) == 1 and os.path.getsize(tmp_path / events[0]) > 0
