"""Virtual environments holding exactly what the docs tell a serving host to install, for the serving tests.

The install line is the example server's own `INSTALL` (docs/serving.md quotes it; tests/test_onnx.py
checks that it does), at requirements.txt's versions, from the package index pip reaches. A venv is built
once per install line and set of pins, under ~/.cache/cvt_jax/serving-venvs (about 50 s for onnxruntime,
numpy and pillow on a 2-core CPU), and reused after.
"""

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import types

import filelock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cvt_jax", "serving-venvs")


def python_with(install: str) -> str:
  """The interpreter of a venv made by `install` ('pip install a b c') under requirements.txt's pins."""
  command, packages = install.split()[:2], install.split()[2:]
  assert command == ["pip", "install"] and packages, install
  with open(REQUIREMENTS) as f:
    key = hashlib.sha256((install + f.read()).encode()).hexdigest()[:16]
  venv = os.path.join(CACHE, key)
  python = os.path.join(venv, "bin", "python")
  os.makedirs(CACHE, exist_ok=True)
  with filelock.FileLock(venv + ".lock"):  # pytest-xdist workers share the venv
    if not os.path.exists(os.path.join(venv, ".complete")):
      shutil.rmtree(venv, ignore_errors=True)
      env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout's
      subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=env)
      subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", REQUIREMENTS,
                      *packages], check=True, timeout=1200, env=env)
      open(os.path.join(venv, ".complete"), "w").close()
  return python


def example(name: str) -> types.ModuleType:
  """examples/`name`.py, imported."""
  sys.path.insert(0, EXAMPLES)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(EXAMPLES)


def python_for(name: str) -> str:
  """The interpreter of a venv made by examples/`name`.py's INSTALL line."""
  return python_with(example(name).INSTALL)
