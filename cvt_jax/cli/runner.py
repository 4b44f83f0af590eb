"""What every `cvt-jax` command shares: one way to parse flags and configs, to fail, and to log.

Every command takes absl flags and prints `--help` (exit status 0). A user error (a bad flag or config
value, a missing file, an output that cannot be written) ends the command with one line,
`cvt-jax <command>: error: <what and where>`, and exit status 2 (bad arguments) or 1 (the work failed);
`--debug` or CVT_JAX_DEBUG=1 shows the traceback as well, for a bug report. The console shows the
command's own log lines, warnings and errors; library INFO lines (orbax, clu, ...) go to the run's log
file only (`<workdir>/train.log` for training).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import textwrap
import traceback
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from cvt_jax import workdir

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's C++ INFO lines (oneDNN notices, ...) are not the run's: warnings and errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")


class UsageError(ValueError):
  """Bad command-line arguments: reported in one line with exit status 2."""


def print_lines(lines: Sequence[str]) -> None:
  """Prints `lines` to stdout; a reader that stops early (`| head -2`) is not an error."""
  try:
    for line in lines:
      print(line)
    sys.stdout.flush()
  except BrokenPipeError:
    # Python flushes stdout again at exit, into the same closed pipe: point it at /dev/null first.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def no_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments, for the commands that take flags only."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run(main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None, doc: str,
        flag_values: flags.FlagValues, extra_help: Callable[[], str] | None = None) -> NoReturn:
  """Parses `flag_values` from `argv` and runs `main_fn(remaining args)` with the project's error policy.

  Args:
    main_fn: the command; returns an exit status (None = 0). Its user errors are exceptions (ValueError,
      OSError, ...), reported in one line; anything else is reported the same way with a hint to --debug.
    argv: [program name, args...]; None takes sys.argv.
    doc: the command's description (its module docstring), printed by --help.
    flag_values: the command's own flags (each command has a `FlagValues` of its own, so that commands
      can be imported side by side).
    extra_help: more --help text (e.g. the config fields).
  """
  argv = list(sys.argv if argv is None else argv)
  prog = argv[0] if argv[0].startswith("cvt-jax") else os.path.basename(argv[0])
  debug = "--debug" in argv or os.environ.get("CVT_JAX_DEBUG", "") not in ("", "0")
  argv = [a for a in argv if a != "--debug"]
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print_lines([_help(doc, flag_values, extra_help)])
    sys.exit(0)
  saved_argv = sys.argv
  try:
    argv = resolve_config_args(argv)
    sys.argv = argv  # ml_collections reads the --config.<field> overrides off sys.argv
    if flag_values.is_parsed():  # a second run in the same process (tests): forget the first one's
      flag_values.unparse_flags()
      for name in [n for n in flag_values if "." in n]:  # ml_collections' --config.<field> overrides
        delattr(flag_values, name)
    remaining = flag_values(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
    _report(prog, _unknown_config_field(e, argv), 2, debug)
  except Exception as e:  # pylint: disable=broad-except  # config files run code while they are parsed
    _report(prog, e, 2, debug)
  finally:
    sys.argv = saved_argv
  setup_logging()
  try:
    status = main_fn(remaining)
  except (UsageError, workdir.OutputError) as e:
    _report(prog, e, 2, debug)
  except KeyboardInterrupt:
    fail(prog, "interrupted", 130)
  except Exception as e:  # pylint: disable=broad-except  # the policy: one line, traceback on --debug
    _report(prog, e, 1, debug)
  sys.exit(status or 0)


def _unknown_config_field(error: BaseException, argv: Sequence[str]) -> UsageError:
  """ml_collections' "'lrr'\\nDid you mean "lr"...?" as '--config.optim.lrr: no such config field (...)'."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0] if error.args else error)
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
               a.split("=")[0].rsplit(".", 1)[-1] == key), f"--config...{key}")
  return UsageError(f"{flag}: no such config field" + (f" ({hint.strip()})" if hint else ""))


def _report(prog: str, error: BaseException, status: int, debug: bool) -> NoReturn:
  if debug:
    traceback.print_exception(error)
  fail(prog, one_line(error, debug), status)


# Errors whose message is the whole story; anything else is reported with its type (likely a bug).
_USER_ERRORS = (ValueError, OSError, FloatingPointError, flags.Error)


def one_line(error: BaseException, debug: bool = True) -> str:
  """An exception as one line: its message (whitespace collapsed); a likely bug adds how to see more."""
  text = str(error)
  if "Traceback (most recent call last)" in text:  # absl quotes a config file's traceback: keep its verdict
    text = f"{text.split(':', 1)[0]}: {text.strip().splitlines()[-1]}"
  text = " ".join(text.split()) or type(error).__name__
  if isinstance(error, OSError) and error.strerror and error.filename:
    text = f"{error.filename}: {error.strerror}"
  if isinstance(error, _USER_ERRORS) or debug:
    return text
  return f"{text} (an unexpected {type(error).__name__}: rerun with --debug for the traceback)"


def fail(prog: str, message: str, status: int) -> NoReturn:
  """Ends the command with `<prog>: error: <message>` on stderr and exit status `status`."""
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _help(doc: str, flag_values: flags.FlagValues, extra_help: Callable[[], str] | None) -> str:
  text = textwrap.dedent(doc).strip() + "\n\nflags:\n"
  text += "\n".join(flag_values.module_help(m) for m in flag_values.flags_by_module_dict()) or "  (none)"
  text += "\n  --debug: show the traceback of an error (or set CVT_JAX_DEBUG=1)"
  if extra_help:
    text += "\n\n" + extra_help()
  return text


def define_config_flag(flag_values: flags.FlagValues, help_text: str) -> flags.FlagHolder:
  """--config NAME[:arg] or a config file, its fields overridable with --config.<field>=<value>."""
  return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True, flag_values=flag_values)


class _HeadsParser(flags.ArgumentParser):
  """'1,2,3' -> (1, 2, 3): attention heads per stage."""

  syntactic_help = "three positive integers, e.g. 1,3,6"

  def parse(self, argument: Any) -> tuple[int, int, int]:
    if isinstance(argument, tuple):
      return argument
    try:
      heads = tuple(int(h) for h in str(argument).split(","))
    except ValueError:
      heads = ()
    if len(heads) != 3 or min(heads) <= 0:
      raise ValueError(f"expected three positive integers such as 1,3,6, got {argument!r}")
    return heads

  def flag_type(self) -> str:
    return "heads"


def define_heads_flag(flag_values: flags.FlagValues) -> flags.FlagHolder:
  """--heads H0,H1,H2 for custom-width PyTorch checkpoints (heads cannot be read off the tensors)."""
  return flags.DEFINE(_HeadsParser(), "heads", None, "Attention heads per stage of a custom-width PyTorch "
                      "checkpoint (widths not multiples of 64); named variants need none.",
                      flag_values=flag_values)


def resolve_config_args(argv: list[str]) -> list[str]:
  """`--config cvt13[:args]` -> the packaged config file; paths (configs/cvt13.py) are kept as given."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
    elif arg.startswith("--config="):
      out[i] = "--config=" + resolve_config(arg[len("--config="):])
  return out


def resolve_config(value: str) -> str:
  """'cvt13:res=384' -> '<package>/configs/cvt13.py:res=384' when no such path exists as given."""
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  packaged = os.path.join(CONFIGS_DIR, name)
  if not os.path.isfile(packaged):
    raise UsageError(f"--config {path}: no such file, and no packaged config of that name "
                     f"({', '.join(packaged_configs())})")
  return packaged + sep + arg


def packaged_configs() -> list[str]:
  """Names of the configs shipped in cvt_jax/configs ('cvt13', 'demo', ...)."""
  return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def config_fields_help() -> str:
  """--help text listing every config field with its default (configs/common.py)."""
  from cvt_jax.configs import common  # pylint: disable=g-import-not-at-top

  def walk(node: Any, prefix: str) -> list[str]:
    lines = []
    for key in sorted(node.keys()):
      value = node[key]
      if hasattr(value, "keys"):
        lines += walk(value, f"{prefix}{key}.")
      else:
        lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines

  return ("configs (--config NAME[:arg=value,...] or a path): " + ", ".join(packaged_configs())
          + "\nconfig fields, with configs/common.py's defaults (override any of them):\n"
          + "\n".join(walk(common.get_config(), "")))


# `logging.info(..., extra=LOG_FILE_ONLY)`: a line for the log file, not the console (e.g. the whole config).
LOG_FILE_ONLY = {"console": False}


def _ours(record: logging.LogRecord) -> bool:
  return record.pathname.startswith(PACKAGE_DIR)


class _ConsoleFilter(logging.Filter):
  """INFO lines of cvt_jax itself (unless marked LOG_FILE_ONLY), and WARNING and above from everyone."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return _ours(record) and getattr(record, "console", True)


class _ConsoleFormatter(logging.Formatter):
  """A tool's console lines: '22:12:18 message' for cvt_jax's own, 'WARNING'/'ERROR' and the library's name
  before a library's, whose warnings show their first line only (the log file has the rest)."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if not _ours(record):
      first = message.strip().splitlines()
      message = (first[0] if first else "") + (" [...]" if len(first) > 1 or record.exc_info else "")
      message = f"{record.name.split('.')[0]}: {message}"
    level = "" if record.levelno < logging.WARNING else f"{record.levelname} "
    return f"{self.formatTime(record, '%H:%M:%S')} {level}{message}"


def setup_logging() -> None:
  """The console: the command's INFO lines and everyone's warnings, as time and message."""
  flags.FLAGS.mark_as_parsed()  # absl's own flags (log settings) keep their defaults: no pre-parse warning
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
    handler.addFilter(_ConsoleFilter())
    handler.setFormatter(_ConsoleFormatter())
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.root.setLevel(logging.INFO)
  # huggingface_hub prints its warnings through a stderr handler of its own as well: once is enough.
  import huggingface_hub  # pylint: disable=g-import-not-at-top,unused-import  # installs that handler
  logging.getLogger("huggingface_hub").handlers.clear()


@contextlib.contextmanager
def logging_to(log_file: str) -> Iterator[None]:
  """Everything logged at INFO and above, libraries included, is also appended to `log_file`."""
  handler = logging.FileHandler(log_file)
  handler.setFormatter(absl_logging.PythonFormatter())
  logging.root.addHandler(handler)
  try:
    yield
  finally:
    logging.root.removeHandler(handler)
    handler.close()
