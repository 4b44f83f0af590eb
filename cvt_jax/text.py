"""Quantities as the commands' messages print them: '15.75 GiB', '4 devices', '2 processes'."""


def gib(n: float) -> str:
  """'15.75 GiB'."""
  return f"{n / 2**30:.2f} GiB"


def plural(count: int, noun: str) -> str:
  """'1 device', '4 devices', '2 processes'."""
  return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")
