"""Bad input to every command: one line naming the offending thing, the right exit status, nothing lost.

Each case runs `cvt-jax <command> ...` in this process against a user's world: a trained workdir, its data,
converted weights, a PyTorch file, images. Every file of that world is hashed before and after the case;
none may change, appear or disappear. Exit status 2 is a bad argument (flags, config values, outputs),
1 is work that could not be done (missing or mismatched checkpoints, a workdir in use or of another run).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import time

import finetuned_tiny
import pytest

from cvt_jax.aot import hardware
from cvt_jax.cli import main as cli
from cvt_jax.data import input_pipeline
from cvt_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_arch(dims: str = "(8,16,24)", heads: str = "(1,2,3)") -> list[str]:
  return ["--config.model.variant=tiny", f"--config.model.dims={dims}", "--config.model.depths=(1,2,3)",
          f"--config.model.heads={heads}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The user's files: {name: path}."""
  finetuned = finetuned_tiny.shared(tmp_path_factory)
  root = tmp_path_factory.mktemp("world")
  paths = {"workdir": finetuned.workdir, "tree": finetuned.tree, "digits": finetuned.digits,
           "npz": finetuned.npz, "pth": finetuned_tiny.PTH_FIXTURE,
           "image": finetuned_tiny.val_images(finetuned.tree, 1)[0]}
  paths["file"] = str(root / "notes.txt")
  (root / "notes.txt").write_text("a user's file")
  paths["folder"] = str(root / "photos")
  os.makedirs(paths["folder"])
  paths["json_folder"] = str(root / "results.json")
  os.makedirs(paths["json_folder"])
  (root / "photos" / "holiday.txt").write_text("not a cvt_jax workdir")
  truncated = root / "truncated.pth"
  truncated.write_bytes(open(finetuned_tiny.PTH_FIXTURE, "rb").read()[:5000])
  paths["truncated"] = str(truncated)
  labels = root / "labels.txt"
  labels.write_text("one\ntwo\n")
  paths["labels"] = str(labels)
  paths["out"] = str(root / "out")
  paths["shards"] = str(root / "shards")
  prepare.prepare(finetuned.tree, paths["shards"], log=lambda _: None)
  return paths


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
  """A folder nobody can write to: a read-only tmpfs when root (who writes through permissions), else 0o555."""
  folder = str(tmp_path_factory.mktemp("readonly"))
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    yield folder
    os.chmod(folder, 0o755)
    return
  subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", folder], check=True)
  yield folder
  subprocess.run(["umount", folder], check=True)


def snapshot(*roots: str) -> dict[str, str | bytes]:
  """path -> sha256 of every file under `roots` (links followed), plus the folders themselves; a run log
  (train*.log) -> its bytes, which a refused run may only append to."""
  digests = {}
  for root in roots:
    files = [root] if os.path.isfile(root) else []
    for folder, _, names in os.walk(root):
      digests[folder] = "dir"
      files += [os.path.join(folder, name) for name in names]
    for path in files:
      data = open(path, "rb").read()
      digests[path] = data if fnmatch.fnmatch(os.path.basename(path), "train*.log") else (
          hashlib.sha256(data).hexdigest())
  return digests


def assert_nothing_lost(before: dict, after: dict) -> None:
  assert set(after) == set(before)
  changed = [k for k in before if after[k] != before[k] and not (
      isinstance(before[k], bytes) and after[k].startswith(before[k]))]
  assert not changed, changed




def train(workdir: str = "{out}/run", data: str = "{tree}", classes: int = 5, **arch: str) -> list[str]:
  return ["train", "--config", f"finetune:data={data},classes={classes},res=32,batch=64", "--workdir", workdir,
          *tiny_arch(**arch)]


TRAIN = train()


def evaluate(data: str = "{tree}", checkpoint: str = "{workdir}") -> list[str]:
  return ["eval", "--config", "finetune:classes=5,res=32", "--data", data, "--checkpoint", checkpoint]


EVAL = evaluate()
PREDICT = ["predict", "--checkpoint", "{workdir}", "{image}"]

USER_FILES = ("workdir", "tree", "digits", "shards", "npz", "pth", "file", "folder", "labels")
# (id, argv, exit status, text the one-line message must contain)
CASES = [
    ("train/typo", [*TRAIN, "--config.optim.lrr=1"], 2,
     "--config.optim.lrr: no such config field (Did you mean"),
    ("train/no config file", ["train", "--config", "cvt99", "--workdir", "{out}/run"], 2,
     "--config cvt99: no such file"),
    ("train/config file is not python", ["train", "--config", "{file}", "--workdir", "{out}/run"], 2,
     "notes.txt"),
    ("train/bad config arg", ["train", "--config", "cvt13:res=big", "--workdir", "{out}/run"], 2,
     "Config arg res='big' is not a valid int"),
    ("train/no workdir", ["train", "--config", "cvt13"], 2, "--workdir"),
    ("train/extra argument", [*TRAIN, "more"], 2, "unexpected arguments: more"),
    ("train/lr inf", [*TRAIN, "--config.optim.lr=inf"], 2, "optim.lr=inf must be finite"),
    ("train/lr negative", [*TRAIN, "--config.optim.lr=-0.1"], 2, "optim.lr=-0.1 must be positive"),
    ("train/batch vs devices", [*TRAIN, "--config.global_batch_size=6"], 2,
     "global_batch_size=6 must be a positive multiple of the device count"),
    ("train/image size 0", [*TRAIN, "--config.data.image_size=0"], 2, "data.image_size=0 must be >= 32"),
    ("train/unknown variant", ["train", "--config", "cvt13", "--workdir", "{out}/run",
                               "--config.model.variant=cvt-99"], 2, "Unknown CvT variant 'cvt-99'"),
    ("train/no data dir", [*TRAIN, "--config.data.data_dir=/no/such/data"], 2,
     "data.data_dir='/no/such/data' is not a directory"),
    ("train/bad dtype", [*TRAIN, "--config.model.dtype=float8"], 2, "model.dtype='float8'"),
    ("train/bad crop scale", [*TRAIN, "--config.data.crop_scale=(0.5,2.0)"], 2, "data.crop_scale=(0.5, 2.0)"),
    ("train/bad interpolation", [*TRAIN, "--config.data.interpolation=lanczos"], 2,
     "data.interpolation='lanczos'"),
    ("train/bad remat", [*TRAIN, "--config.model.remat=all"], 2, "model.remat='all'"),
    ("train/accumulation", [*TRAIN, "--config.optim.grad_accum_steps=3"], 2,
     "optim.grad_accum_steps=3 must divide the per-device batch"),
    ("train/missing init_from", [*TRAIN, "--config.init_from=/no/such.npz"], 2,
     "init_from='/no/such.npz' does not exist"),
    ("train/workdir is a file", train("{file}"), 1, "is not writable"),
    ("train/another model's workdir", train("{workdir}", dims="(8,16,32)", heads="(1,2,4)"), 1,
     "belongs to another run"),
    ("train/other classes", train("{workdir}", "{digits}", 10), 1, "belongs to another run"),
    # Refused before a file is written: the new workdir ({out}/run) does not even appear.
    ("train/init_from another architecture", [*train(dims="(8,16,32)", heads="(1,2,4)"),
                                              "--config.init_from={npz}"], 1,
     "init_from {npz} holds a"),
    ("eval/resolution below 32", [*EVAL, "--image_size", "16"], 2, "--image_size=16"),
    ("prepare/missing source", ["prepare", "{out}/none", "{out}/shards"], 1, "does not exist"),
    ("prepare/over a user's folder", ["prepare", "{tree}", "{folder}"], 1,
     "is not empty and holds no preparation to resume"),
    ("eval/no checkpoint", evaluate(checkpoint="{out}/none.npz"), 1, "none.npz does not exist"),
    ("eval/not a workdir", evaluate(checkpoint="{folder}"), 1, "holds no checkpoints/ folder"),
    ("eval/no config", ["eval", "--checkpoint", "{workdir}"], 2, "--config"),
    ("eval/output is a folder", [*EVAL, "--output", "{json_folder}"], 2, "results.json is a folder"),
    ("eval/output read-only", [*EVAL, "--output", "{readonly}/eval.json"], 2, "is not writable"),
    ("eval/output not json", [*EVAL, "--output", "{out}/eval.txt"], 2, "expected a .json file name"),
    ("eval/missing data", evaluate(data="/no/such/tree"), 2, "data.data_dir='/no/such/tree' is not a directory"),
    ("eval/class mismatch", evaluate(data="{digits}"), 1, "has 10 classes"),
    ("eval/typo", [*EVAL, "--config.eval_batchsize=8"], 2, "--config.eval_batchsize: no such config field"),
    ("eval/no data", ["eval", "--config", "demo", "--checkpoint", "{workdir}"], 2,
     "data.source='array_record' needs data.data_dir, a dataset written by `cvt-jax prepare`: give "
     "--config.data.data_dir=<the folder it wrote>"),
    ("eval/folder without its root", ["eval", "--config", "demo", "--checkpoint", "{workdir}",
                                      "--config.data.source=folder"], 2,
     "data.source='folder' needs data.data_dir, the folder tree's root (holding train/ and val/): give "
     "--config.data.data_dir=<root>"),
    ("eval/prepared dataset as a tree", evaluate(data="{shards}"), 1,
     "{shards} is a dataset written by `cvt-jax prepare`, not a folder tree of class folders: read it with "
     "--config.data.source=array_record --config.data.data_dir={shards}"),
    ("train/tree as a prepared dataset", ["train", "--config", "demo", "--workdir", "{out}/run",
                                          "--config.data.data_dir={digits}"], 1,
     "{digits} is a folder tree of class folders, not a dataset written by `cvt-jax prepare`: read it as it "
     "is with --config.data.source=folder, or prepare it once (cvt-jax prepare {digits} <folder>)"),
    ("train/class count of a tree", train(classes=4), 1,
     "model.num_classes=4 but the folder tree {tree} has 5 classes: give --config.model.num_classes=5"),
    ("train/class count of a prepared dataset", train(data="{shards}", classes=4), 1,
     "model.num_classes=4 but the prepared dataset {shards} has 5 classes: give --config.model.num_classes=5"),
    ("predict/top_k", [*PREDICT, "--top_k", "-2"], 2, "--top_k=-2"),
    ("predict/batch_size", [*PREDICT, "--batch_size", "0"], 2, "--batch_size=0"),
    ("predict/image_size", [*PREDICT, "--image_size", "0"], 2, "--image_size=0"),
    ("predict/no images", ["predict", "--checkpoint", "{workdir}"], 2, "name at least one image"),
    ("predict/empty folder", ["predict", "--checkpoint", "{workdir}", "{folder}"], 2, "no image files"),
    ("predict/no checkpoint", ["predict", "--checkpoint", "{out}/none.npz", "{image}"], 1,
     "none.npz does not exist"),
    ("predict/labels count", [*PREDICT, "--labels", "{labels}"], 1, "2 class names for a 5-class head"),
    ("predict/labels missing", [*PREDICT, "--labels", "{out}/labels.txt"], 1, "labels.txt"),
    ("predict/output read-only", [*PREDICT, "--output", "{readonly}/p.json"], 2, "is not writable"),
    ("convert/not npz", ["convert", "{pth}", "{out}/w.bin"], 2, "expected a .npz file name"),
    ("convert/read-only", ["convert", "{pth}", "{readonly}/w.npz"], 2, "is not writable"),
    ("convert/missing source", ["convert", "{out}/none.pth", "{out}/w.npz"], 1, "none.pth does not exist"),
    ("convert/truncated", ["convert", "{truncated}", "{out}/w.npz"], 1, "truncated or corrupt"),
    ("convert/heads", ["convert", "{pth}", "{out}/w.npz", "--heads", "1,2"], 2,
     "expected three positive integers"),
    ("convert/over existing folder", ["convert", "{pth}", "{folder}"], 2, "expected a .npz file name"),
    ("summary/classes", ["summary", "--num_classes", "-1"], 2, "--num_classes=-1"),
    ("summary/res", ["summary", "--res", "0"], 2, "--res=0"),
    ("summary/variant", ["summary", "cvt-99"], 2, "Unknown CvT variant 'cvt-99'"),
    ("demo/fresh on a user's folder", ["demo", "--fresh", "--workdir", "{folder}", "--data_dir", "{out}/d"],
     1, "refusing to delete {folder}: it does not look like a cvt_jax workdir (it holds holiday.txt)"),
    ("demo/data over a user's folder", ["demo", "--workdir", "{out}/w", "--data_dir", "{folder}"], 1,
     "{folder} exists and is not a digits tree built by cvt_jax"),
    ("demo/epochs", ["demo", "--epochs", "0"], 2, "--epochs=0"),
    ("cvt-jax/unknown command", ["fly"], 2, "unknown command 'fly'"),
]


@pytest.mark.parametrize("argv,status,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_and_nothing_lost(world, readonly, capsys, argv, status, message):
  paths = {**world, "readonly": readonly}
  argv = [a.format(**paths) for a in argv]
  message = message.format(**paths)
  before = snapshot(*(paths[k] for k in USER_FILES))
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", *argv])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("cvt-jax")]
  assert exit_.value.code == status, err
  assert len(lines) == 1 and "Traceback" not in err, err
  assert message in lines[0], lines[0]
  assert_nothing_lost(before, snapshot(*(paths[k] for k in USER_FILES)))
  assert not os.path.exists(paths["out"])  # no output of a failed command is left behind


def test_at_least_forty_cases_over_every_command():
  assert len(CASES) >= 40
  assert {c[1][0] for c in CASES} >= {"train", "eval", "predict", "convert", "summary", "demo"}


def test_a_second_run_in_a_workdir_in_use_refuses_at_once(world, tmp_path, capsys):
  """Another process holds the workdir's lock: the run names it and leaves everything as it was."""
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import time
      from cvt_jax import workdir
      with workdir.Lock({world['workdir']!r}):
        print("locked", flush=True)
        time.sleep(120)""")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = snapshot(world["workdir"])
    started = time.time()
    with pytest.raises(SystemExit) as exit_:
      cli.main(["cvt-jax", *[a.format(**world) for a in train(world["workdir"])]])
    assert time.time() - started < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1
    assert f"workdir {world['workdir']} is in use by pid {holder.pid} on " in err[0]
    # The refused run changed nothing, its log file included (the lock comes first).
    assert snapshot(world["workdir"]) == before
  finally:
    holder.kill()
    holder.wait()


def test_an_eval_batch_the_host_cannot_hold_is_refused_before_it_runs(world, capsys, monkeypatch):
  """On a CPU the compiled eval step's memory analysis is held against the host's available memory."""
  monkeypatch.setattr(hardware, "available_host_memory", lambda: 2**20)
  monkeypatch.setattr(input_pipeline, "eval_batches", lambda *_: pytest.fail("an image was read"))
  before = snapshot(*(world[k] for k in USER_FILES))
  with pytest.raises(SystemExit) as exit_:
    cli.main(["cvt-jax", *[a.format(**world) for a in EVAL]])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("cvt-jax")]
  assert exit_.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
  # 179 images on 4 devices: one batch of 180, not the config's 256.
  assert re.fullmatch(r"cvt-jax eval: error: an eval batch of 180 images at 32 px needs \d+\.\d\d GiB, more "
                      r"than the 0\.00 GiB this host has available: lower --config\.eval_batch_size"
                      r"( \(about \d+ fits\))?", lines[0]), lines[0]
  assert_nothing_lost(before, snapshot(*(world[k] for k in USER_FILES)))


@pytest.fixture
def installed_venv(tmp_path):
  """A venv that `./run.sh` takes as installed, whose python and cvt-jax print the command they were given."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  for name in ("python", "cvt-jax"):  # `python -c ...` is run.sh asking for jaxlib's version: '0'
    (venv / "bin" / name).write_text(f'#!/bin/sh\n[ "$1" = -c ] && echo 0 && exit\necho "{name} $*"\n')
    (venv / "bin" / name).chmod(0o755)
  digest = hashlib.sha256(b"".join(open(os.path.join(ROOT, f), "rb").read()
                                   for f in ("pyproject.toml", "requirements.txt"))).hexdigest()
  for extras in ("tfds-demo", "tfds-demo-test"):
    (venv / f".installed-{extras}").write_text(digest + "\n")
  unpacked = ("torchvision-transforms/torchvision", "timm/timm-1.0.31.dist-info", "libtpu/libtpu", "cuda-compiler")
  for folder in unpacked:
    (venv / folder).mkdir(parents=True)
  (venv / "cuda-compiler" / ".jaxlib-version").write_text("0\n")
  return venv


def run_sh(venv, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, VENV=str(venv), PYTHON=sys.executable))


def test_run_sh_runs_every_cvt_jax_command_and_only_the_tests_named(installed_venv):
  for command in cli.COMMANDS:
    run = run_sh(installed_venv, command, "--help")
    assert (run.returncode, run.stdout) == (0, f"cvt-jax {command} --help\n"), run.stderr
  run = run_sh(installed_venv, "test", "tests/test_configs.py", "-k", "demo")
  assert run.stdout == "python -m pytest -n auto --dist worksteal tests/test_configs.py -k demo\n", run.stderr
  run = run_sh(installed_venv, "help")
  assert all(f"\n  {command} " in run.stdout for command in (*cli.COMMANDS, "test", "lock")), run.stdout
  run = run_sh(installed_venv, "fly")
  assert run.returncode == 2 and run.stderr.splitlines()[0] == "run.sh: unknown command 'fly'"


@pytest.mark.parametrize("command", ["prepare", "compile"])
def test_help_into_a_reader_that_stops_early_ends_cleanly(command):
  """`cvt-jax COMMAND --help | head -1` at its worst: the reader (`true`) is gone before the help is printed."""
  script = f"{sys.executable} -m cvt_jax.cli.main {command} --help | true; exit ${{PIPESTATUS[0]}}"
  done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
