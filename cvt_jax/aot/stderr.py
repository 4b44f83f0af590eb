"""Console noise of native code: C++ that writes to file descriptor 2 before any log level applies.

The CUDA PJRT plugin prints that way as it loads ("All log messages before absl::InitializeLog() ...",
"Could not find cuda drivers"); `redirected` points the descriptor elsewhere for the length of such a call.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def redirected(path: str = os.devnull) -> Iterator[None]:
  """File descriptor 2 appends to `path` inside the block (Python's sys.stderr is flushed first)."""
  sys.stderr.flush()
  console = os.dup(2)
  target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  try:
    os.dup2(target, 2)
    yield
  finally:
    os.dup2(console, 2)
    os.close(console)
    os.close(target)
