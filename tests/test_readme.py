"""The documentation's cheap command blocks run as pasted: those marked `<!-- runs as pasted -->` (the line
before their fence) in README.md and docs/*.md, every shell line and every Python snippet, from the
repository root, in a fresh process."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- runs as pasted -->"
_BLOCK = re.compile(re.escape(MARKER) + r"\n```(bash|python)\n(.*?)\n```", re.S)
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _blocks() -> list[tuple[str, str, str]]:
  """(page, kind, text) of every marked block, in page order."""
  found = []
  for page in PAGES:
    with open(os.path.join(ROOT, page)) as f:
      found += [(page, kind, text) for kind, text in _BLOCK.findall(f.read())]
  return found


def test_the_pages_mark_their_cheap_blocks():
  # The README keeps at least one; the marked blocks of the user guide cover the Python API, features,
  # converting, evaluating and serving (a marker whose fence does not follow it is not found, and fails here).
  pages = [page for page, _, _ in _blocks()]
  assert "README.md" in pages
  assert len(pages) >= 6, pages
  for page in PAGES:
    with open(os.path.join(ROOT, page)) as f:
      text = f.read()
    markers = re.findall("^" + re.escape(MARKER) + "$", text, re.M)
    assert len(markers) == len(_BLOCK.findall(text)), f"{page}: a marker not followed by a fenced block"


@pytest.mark.parametrize("index", range(len(_blocks())),
                         ids=[f"{page}-{i}" for i, (page, _, _) in enumerate(_blocks())])
def test_a_marked_block_runs_as_pasted(index, tmp_path):
  _, kind, text = _blocks()[index]
  # The pages' `.venv/bin/` is this interpreter's bin/ (the same venv under ./run.sh test).
  bin_dir = os.path.dirname(sys.executable)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  if kind == "python":
    commands = [[sys.executable, "-c", text]]
  else:
    lines = [line.split("  #")[0].strip() for line in text.replace("\\\n", " ").splitlines()]
    commands = [["bash", "-c", line.replace(".venv/bin/", f"{bin_dir}/")] for line in lines
                if line and not line.startswith("#")]
  work = tmp_path / "checkout"  # a copy of the tracked files: what the blocks write stays out of the repo
  for name in filter(None, subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                          text=True, check=True).stdout.split("\0")):
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(os.path.dirname(work / name), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), work / name)
  for command in commands:
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command[-1]}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{command[-1]}\n{result.stderr[-3000:]}"
