"""Variable trees as flat 'collection/module/.../leaf' dicts, and the one strict comparison of two of them."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

Shape = tuple[int, ...]


class TreeMismatchError(ValueError):
  """Two variable trees that should hold the same arrays do not."""


def flatten(tree: Any) -> dict[str, Any]:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x}; dataclass fields (TrainState) count as keys."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten` for nested dicts."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def shapes(flat: Mapping[str, Any]) -> dict[str, Shape]:
  """Flat key -> shape of every leaf (arrays, `ShapeDtypeStruct`s, orbax metadata)."""
  return {k: tuple(v.shape) if hasattr(v, "shape") else np.shape(v) for k, v in flat.items()}


def size(tree: Any) -> int:
  """Number of elements in all of a tree's arrays."""
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def mismatches(want: Mapping[str, Shape], have: Mapping[str, Shape], limit: int = 5) -> str:
  """'' when `have` holds exactly `want`'s keys and shapes; else one line naming the differences.

  Lists at most `limit` keys of each kind: missing (in `want` only), unused (in `have` only) and
  mis-shaped (`key <have shape> instead of <want shape>`).
  """
  missing = [f"{k} {want[k]}" for k in sorted(want.keys() - have.keys())]
  unused = [f"{k} {have[k]}" for k in sorted(have.keys() - want.keys())]
  misshaped = [f"{k} {have[k]} instead of {want[k]}" for k in sorted(want.keys() & have.keys())
               if have[k] != want[k]]

  def listing(what: str, keys: list[str]) -> str:
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what} ({', '.join(keys[:limit])}{more})"

  return "; ".join(listing(what, keys) for what, keys in
                   (("missing", missing), ("unused", unused), ("mis-shaped", misshaped)) if keys)


def check(want: Mapping[str, Shape], have: Mapping[str, Shape], what: str) -> None:
  """Raises `TreeMismatchError` ('<what>: 2 missing (...); 1 mis-shaped (...)') unless the trees agree."""
  problems = mismatches(want, have)
  if problems:
    raise TreeMismatchError(f"{what}: {problems}")


def merge(target: Any, loaded: Mapping[str, Any], what: str,
          keep_target: Callable[[str], bool] = lambda key: False) -> dict[str, Any]:
  """Every array of `target` taken from the flat `loaded`, strictly (big_vision's `merge_params`).

  Keys for which `keep_target(key)` holds keep the target's value and are not required in `loaded`.
  Values are cast to the target's dtypes. Raises `TreeMismatchError` naming every other difference.
  """
  want = {k: v for k, v in flatten(target).items() if not keep_target(k)}
  have = {k: v for k, v in loaded.items() if not keep_target(k)}
  check(shapes(want), shapes(have), what)
  merged = {k: (v if keep_target(k) else np.asarray(loaded[k], dtype=v.dtype))
            for k, v in flatten(target).items()}
  return unflatten(merged)
