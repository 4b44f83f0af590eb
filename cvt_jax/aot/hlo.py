"""What a compiled XLA program does, read off its optimised HLO text (`compiled.as_text()`).

XLA's cost analysis gives one total for a TPU program and nothing for a GPU one compiled without a GPU,
and neither says which part of the model the traffic belongs to. This module models it kernel by kernel:

- a **kernel** is an instruction that runs on the device: every instruction of the entry computation and of
  loop bodies and branches (times a loop's known trip count), except the free ones (parameters, tuples,
  bitcasts, the `-done` halves of async pairs). A fusion, a library call (cuBLAS, cuDNN), a Pallas kernel
  and a copy are one kernel each;
- its **bytes** are the device-memory (HBM) traffic of its operands and outputs as laid out (TPU tiles pad
  the two minor axes), counting only the slices a fusion reads of an operand, and nothing for arrays that
  memory-space assignment placed on chip (`S(1)`: a TPU core's VMEM) or a library call's scratch space.
  XLA's own TPU figure ("bytes accessed") counts every operand and output in every memory space, the
  on-chip copies included, so it comes out about twice as large (bench/README.md);
- its **FLOPs** are those of its matrix products and convolutions (multiply-adds times two, taps that fall
  on padding excluded) or, for a Pallas kernel, of its own cost estimate; elementwise work is not counted;
- its **part** of the model comes from the `op_name` metadata JAX writes: the flax module path
  (`stages_0/blocks_0/attn/proj_q`), `transpose(...)` for the backward pass, the train step's named scopes
  (`augment`, `loss`, `optimizer`); an instruction XLA added without one (a prefetch into VMEM) belongs
  to the nearest consumer or producer that has one.

Every figure derived from these is modelled, not measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Callable, Iterable

import numpy as np

_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
               "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
               "token": 0}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "while", "conditional", "call", "add-dependency", "iota"}
_LAYOUT_OPS = {"copy", "transpose", "reshape"}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result type as printed: `bf16[8,56,56,64]{3,2,1,0}` or a tuple of them
  opcode: str
  operands: list[str]
  attributes: str

  def attribute(self, key: str) -> str | None:
    """The text of `key=...`: a `{...}` group's or a quoted string's inside, or a bare word."""
    match = re.search(rf"\b{re.escape(key)}=", self.attributes)
    if not match:
      return None
    start, text = match.end(), self.attributes
    if text[start] == "{":
      return text[start + 1:_closing(text, start)]
    if text[start] == '"':
      return text[start + 1:text.index('"', start + 1)]
    return re.match(r"[^,\s]*", text[start:])[0].lstrip("%")

  @property
  def op_name(self) -> str:
    match = re.search(r'op_name="([^"]*)"', self.attributes)
    return match[1] if match else ""

  @property
  def custom_call_target(self) -> str:
    return self.attribute("custom_call_target") or ""


@dataclasses.dataclass
class Module:
  """The computations of an HLO module, by name, and the entry computation's name."""

  computations: dict[str, list[Instruction]]
  entry: str

  def shapes(self, computation: str) -> dict[str, str]:
    return {i.name: i.shape for i in self.computations[computation]}


def _split_top(text: str, sep: str = ",") -> list[str]:
  """`text` split at `sep` outside brackets and quotes."""
  parts, depth, quoted, start = [], 0, False, 0
  for i, ch in enumerate(text):
    if ch == '"':
      quoted = not quoted
    elif not quoted and ch in "([{":
      depth += 1
    elif not quoted and ch in ")]}":
      depth -= 1
    elif not quoted and depth == 0 and ch == sep:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start` (brackets inside quotes do not count)."""
  depth, quoted = 0, False
  for i in range(start, len(text)):
    if text[i] == '"':
      quoted = not quoted
    elif quoted:
      continue
    elif text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _parse_instruction(line: str) -> Instruction | None:
  head = _INSTRUCTION.match(line)
  if not head:
    return None
  rest = line[head.end():]
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index("(")
  opcode = rest[:paren]
  close = _closing(rest, paren)
  operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[paren + 1:close])]
  return Instruction(head[2], shape, opcode, operands, rest[close + 1:])


def parse(text: str) -> Module:
  """The computations of `compiled.as_text()`."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header[2]
      computations[current] = []
      if header[1]:
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      instruction = _parse_instruction(line)
      if instruction:
        computations[current].append(instruction)
  return Module(computations, entry)


# -------------------------------------------------------------------------------------- sizes --


def _tiled_dims(dims: list[int], layout: str) -> list[int]:
  """`dims` padded to the layout's first tile (`{1,0:T(8,128)(2,1)}`: the two most minor axes to 8 x 128)."""
  minor_to_major, _, tiling = layout.partition(":")
  tile = re.search(r"T\(([\d,]+)\)", tiling)
  if not tile or not minor_to_major:
    return dims
  order = [int(d) for d in minor_to_major.split(",")]
  padded = list(dims)
  sizes = [int(t) for t in tile[1].split(",")]
  for axis, size in zip(order[:len(sizes)], reversed(sizes)):
    padded[axis] = -(-dims[axis] // size) * size
  return padded


def array_bytes(shape: str) -> int:
  """Bytes in device memory of every array in a (tuple) type, as laid out. Arrays in another memory space
  (`S(1)`: a TPU core's own VMEM, ...) are on chip and count nothing."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if re.search(r"S\([1-9]\d*\)", layout):
      continue
    sizes = [int(d) for d in dims.split(",") if d]
    if layout:
      sizes = _tiled_dims(sizes, layout)
    total += math.prod(sizes) * _DTYPE_BITS.get(dtype, 32) // 8
  return total


def _dims(shape: str, index: int = 0) -> list[int]:
  arrays = _ARRAY.findall(shape)
  return [int(d) for d in arrays[index][1].split(",") if d] if arrays else []


def _ints(text: str | None) -> list[int]:
  return [int(t) for t in re.findall(r"\d+", text or "")]


# ------------------------------------------------------------------------------------- kernels --


@dataclasses.dataclass
class Kernel:
  """One device kernel of the program: what it is, its modelled traffic and FLOPs, whose it is."""

  name: str
  kind: str
  op_name: str
  bytes: float
  flops: float
  count: int = 1  # executions per step (loop trip counts)


def _dot_flops(out_shape: str, lhs_shape: str, contracting: list[int]) -> float:
  lhs = _dims(lhs_shape)
  return 2.0 * math.prod(_dims(out_shape)) * math.prod(lhs[d] for d in contracting)


def _window(attributes: Instruction, rank: int) -> list[dict[str, tuple[int, ...]]]:
  """Per spatial axis: size, stride, padding, lhs and rhs dilation of a convolution's `window={...}`."""
  fields = dict(re.findall(r"(\w+)=([\d_x\-]+)", attributes.attribute("window") or ""))
  axes = []
  for k in range(rank):
    get = lambda key, default: (int(fields[key].split("x")[k]) if key in fields else default)
    pad = fields["pad"].split("x")[k].split("_") if "pad" in fields else ("0", "0")
    axes.append({"size": get("size", 1), "stride": get("stride", 1), "pad": int(pad[0]),
                 "lhs_dilate": get("lhs_dilate", 1), "rhs_dilate": get("rhs_dilate", 1)})
  return axes


def _taps(n: int, out: int, axis: dict[str, int]) -> int:
  """(output position, window tap) pairs of one axis that meet an input element, not padding or the holes
  of a dilated input (TPUs write batched and transposed matmuls as such convolutions, with windows as long
  as the batch: counted per tap in closed form, not as an (outputs x taps) table)."""
  stride, dilate = axis["stride"], axis["lhs_dilate"]
  first = np.arange(axis["size"], dtype=np.int64) * axis["rhs_dilate"] - axis["pad"]  # output 0's position
  lo = np.maximum(0, -(first // stride))  # the outputs whose position lies in [0, (n - 1) * dilate]
  hi = np.minimum(out - 1, ((n - 1) * dilate - first) // stride)
  # ... and falls on an input element, not a hole: first + o * stride = 0 (mod dilate).
  g = math.gcd(stride, dilate)
  period = dilate // g
  inverse = pow(stride // g, -1, period) if period > 1 else 0
  residue = ((-first // g) * inverse) % period
  hit = lo + (residue - lo) % period
  counts = np.where((first % g == 0) & (hit <= hi), (hi - hit) // period + 1, 0)
  return int(counts.sum())


def _conv_flops(out_shape: str, lhs_shape: str, attributes: Instruction) -> float:
  """2 x multiply-adds: for every output element, its window's taps that meet input, times the input
  features of its group."""
  labels = attributes.attribute("dim_labels") or "b01f_01io->b01f"
  lhs_labels, _, out_labels = re.split(r"_|->", labels)
  lhs, out = _dims(lhs_shape), _dims(out_shape)
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  axes = _window(attributes, len(spatial))
  pairs = math.prod(_taps(lhs[lhs_labels.index(c)], out[out_labels.index(c)], axis)
                    for c, axis in zip(spatial, axes))
  rest = out[out_labels.index("b")] * out[out_labels.index("f")]
  groups = int(attributes.attribute("feature_group_count") or 1)
  return 2.0 * rest * pairs * lhs[lhs_labels.index("f")] / groups


def _instruction_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """FLOPs of a dot, convolution, cuBLAS or cuDNN call; 0 for anything else."""
  operand = lambda i: shapes.get(instruction.operands[i], "")
  if instruction.opcode == "dot":
    return _dot_flops(instruction.shape, operand(0), _ints(instruction.attribute("lhs_contracting_dims")))
  if instruction.opcode == "convolution":
    return _conv_flops(instruction.shape, operand(0), instruction)
  target = instruction.custom_call_target
  if target.startswith("__cublas"):
    config = json.loads("{" + (instruction.attribute("backend_config") or "") + "}")
    numbers = config.get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
    return _dot_flops(instruction.shape, operand(0), [int(d) for d in numbers.get("lhs_contracting_dimensions", [])])
  if target in ("__cudnn$convForward", "__cudnn$convBiasActivationForward"):
    return _conv_flops(instruction.shape, operand(0), instruction)
  if target == "__cudnn$convBackwardInput":  # (dy, w) -> dx: the forward's output is dy
    return _conv_flops(operand(0), instruction.shape, instruction)
  if target == "__cudnn$convBackwardFilter":  # (x, dy) -> dw
    return _conv_flops(operand(1), operand(0), instruction)
  estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)"', instruction.attributes)  # Pallas kernels
  return float(estimate[1]) if estimate else 0.0


def _kind(instruction: Instruction, module: Module) -> str:
  """The census class of a kernel."""
  target = instruction.custom_call_target
  if target.startswith("__cublas"):
    return "cuBLAS GEMM"
  if target.startswith("__cudnn$conv"):
    return "cuDNN convolution"
  if "fmha" in target:
    return "cuDNN fused attention"
  if target == "tpu_custom_call":
    return "Pallas kernel"
  if instruction.opcode == "custom-call":
    return f"custom call {target}"
  if re.match(r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)", instruction.opcode):
    return "collective"
  if instruction.opcode in ("copy-start", "slice-start"):
    return "move to/from on-chip memory"  # memory-space assignment's prefetches and evictions (TPU)
  if instruction.opcode in _LAYOUT_OPS:
    return "copy/transpose"
  if instruction.opcode == "fusion":
    called = module.computations.get(instruction.attribute("calls") or "", [])
    ops = {i.opcode for i in called} - {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}
    if ops & {"dot", "convolution"}:
      return "fusion with matmul/conv"
    if ops and ops <= _LAYOUT_OPS:
      return "copy/transpose"
    return "other fusion"
  if instruction.opcode in ("dot", "convolution"):
    return "matmul/conv"
  return "other"


def _fusion_cost(instruction: Instruction, module: Module, shapes: dict[str, str]) -> tuple[float, float]:
  """(bytes, FLOPs) of a fusion: each operand counted at the size of the slices the fusion reads of it.

  A dynamic-update-slice of a fusion parameter updates that buffer in place (XLA aliases them; scan loops
  write each step's slice of their stacked outputs so): it writes the update's bytes, and reads nothing of
  the buffer.
  """
  called = module.computations.get(instruction.attribute("calls") or "", [])
  readers: dict[str, list[Instruction]] = {}
  for i in called:
    for o in i.operands:
      readers.setdefault(o, []).append(i)
  params = {int(i.operands[0]): i.name for i in called if i.opcode == "parameter"}
  inner = {i.name: i.shape for i in called}
  in_place = {i.operands[0]: i for i in called if i.opcode == "dynamic-update-slice"
              and i.operands[0] in params.values() and len(readers[i.operands[0]]) == 1}
  nbytes = float(array_bytes(instruction.shape))
  for update in in_place.values():
    buffer = array_bytes(update.shape)
    nbytes -= buffer * (1 - math.prod(_dims(inner[update.operands[1]])) / max(1, math.prod(_dims(update.shape))))
  for index, operand in enumerate(instruction.operands):
    size = array_bytes(shapes.get(operand, ""))
    uses = readers.get(params.get(index, ""), [])
    if params.get(index) in in_place:
      size = 0
    elif uses and all(u.opcode in ("slice", "dynamic-slice") for u in uses):
      size = min(size, sum(array_bytes(u.shape) for u in uses))
    nbytes += size
  return nbytes, _fused_flops(called, module)


def _fused_flops(called: list[Instruction], module: Module) -> float:
  """FLOPs of a fused computation, fusions nested in it included (libtpu fuses a GEMM into its consumer's)."""
  inner = {i.name: i.shape for i in called}
  return sum(_fused_flops(module.computations.get(i.attribute("calls") or "", []), module)
             if i.opcode == "fusion" else _instruction_flops(i, inner) for i in called)


def kernels(module: Module) -> list[Kernel]:
  """Every kernel the program runs, with its modelled bytes and FLOPs."""
  found: list[Kernel] = []

  def walk(computation: str, count: int) -> None:
    shapes = module.shapes(computation)
    owner = _owners(module.computations[computation])
    for instruction in module.computations[computation]:
      if instruction.opcode == "while":
        trips = _trip_count(instruction, module)
        walk(instruction.attribute("body"), count * trips)
        walk(instruction.attribute("condition"), count * trips)
        continue
      if instruction.opcode == "conditional":
        branches = instruction.attribute("branch_computations") or ""
        for branch in re.findall(r"%?([\w.\-]+)", branches):
          walk(branch, count)  # every branch counted: an upper bound
        continue
      if instruction.opcode == "call":
        walk(instruction.attribute("to_apply"), count)
        continue
      if instruction.opcode in _FREE or instruction.opcode.endswith("-done"):
        continue
      if instruction.opcode == "fusion":
        nbytes, flops = _fusion_cost(instruction, module, shapes)
      else:
        nbytes = _output_bytes(instruction) + sum(array_bytes(shapes.get(o, "")) for o in instruction.operands)
        flops = _instruction_flops(instruction, shapes)
      found.append(Kernel(instruction.name, _kind(instruction, module), owner(instruction), nbytes, flops, count))

  walk(module.entry, 1)
  return found


def _owners(computation: list[Instruction]) -> Callable[[Instruction], str]:
  """`op_name` of an instruction, or for one that has none (the prefetches and slices into on-chip memory
  that XLA adds) that of the nearest consumer, else of the nearest producer."""
  by_name = {i.name: i for i in computation}
  users: dict[str, list[Instruction]] = {}
  for i in computation:
    for o in i.operands:
      users.setdefault(o, []).append(i)

  def search(start: Instruction, step: Callable[[Instruction], Iterable[Instruction]]) -> str:
    seen, frontier = {start.name}, [start]
    for _ in range(8):
      frontier = [n for i in frontier for n in step(i) if n.name not in seen and not seen.add(n.name)]
      named = next((n.op_name for n in frontier if n.op_name), "")
      if named or not frontier:
        return named
    return ""

  def owner(instruction: Instruction) -> str:
    return (instruction.op_name or search(instruction, lambda i: users.get(i.name, []))
            or search(instruction, lambda i: [by_name[o] for o in i.operands if o in by_name]))

  return owner


def _output_bytes(instruction: Instruction) -> int:
  """Bytes written: a library call returns (result, scratch workspace), the workspace is not traffic; an
  async start returns (its operands, its results, a sync flag), the operands are not written."""
  if not instruction.shape.startswith("("):
    return array_bytes(instruction.shape)
  elements = _split_top(instruction.shape[1:-1])
  if instruction.opcode == "custom-call":
    return array_bytes(elements[0])
  if instruction.opcode.endswith("-start"):
    return sum(array_bytes(e) for e in elements[1:])
  return array_bytes(instruction.shape)


def _trip_count(instruction: Instruction, module: Module) -> int:
  """The loop's known trip count: XLA's annotation (GPU, CPU), else a condition `counter < constant`
  (libtpu annotates none; JAX's scan and fori_loop counters start at 0). 1 when unknown."""
  match = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
  if match:
    return int(match[1])
  condition = module.computations.get(instruction.attribute("condition") or "", [])
  constants = {i.name: i.operands[0] for i in condition if i.opcode == "constant" and i.operands}
  root = condition[-1] if condition else None  # printed last
  if root and root.opcode == "compare" and "direction=LT" in root.attributes:
    bound = constants.get(root.operands[1], "")
    return int(bound) if bound.isdigit() else 1
  return 1


# ----------------------------------------------------------------------------------- attribution --

# (part, pattern on the op_name path), first match wins. The model's parts are flax module paths.
PARTS = (
    ("augmentation", r"(^|/)augment(/|$)"),
    ("loss", r"(^|/)loss(/|$)"),
    ("optimiser update", r"(^|/)optimizer(/|$)"),
    ("patch embeddings (conv)", r"/patch_embed/proj(/|$)"),
    ("depthwise conv of q/k/v", r"/attn/conv_proj_[qkv]/conv(/|$)"),
    ("BatchNorm of q/k/v", r"/attn/conv_proj_[qkv](/|$)"),
    ("q/k/v GEMMs", r"/attn/proj_[qkv](/|$)"),
    ("attention output GEMM", r"/attn/proj(/|$)"),
    ("attention scores + softmax", r"/attn(/|$)"),
    ("MLP", r"/mlp(/|$)"),
    ("LayerNorms", r"/(norm1|norm2|patch_embed/norm|norm)(/|$)"),
    ("head", r"/head(/|$)"),
    ("residuals, drop path, tokens", r"/(blocks(_\d+)?|stages_\d+)(/|$)"),
)
LAYOUT = "layout changes (copies, transposes)"
OTHER = "other"


def part(kernel: Kernel) -> str:
  """The model part a kernel belongs to; transposes and copies are their own part whoever needs them."""
  if kernel.kind == "copy/transpose":
    return LAYOUT
  path = kernel.op_name
  return next((name for name, pattern in PARTS if re.search(pattern, path)), OTHER)


def is_backward(kernel: Kernel) -> bool:
  """JAX names the backward pass's ops `transpose(jvp(...))`."""
  return "transpose(" in kernel.op_name


@dataclasses.dataclass
class Totals:
  """Kernels, modelled bytes and FLOPs of a group of kernels (per step, loop bodies times their trips)."""

  count: int = 0
  bytes: float = 0.0
  flops: float = 0.0

  def add(self, kernel: Kernel) -> None:
    self.count += kernel.count
    self.bytes += kernel.bytes * kernel.count
    self.flops += kernel.flops * kernel.count


@dataclasses.dataclass
class Analysis:
  """A compiled program, modelled: totals, the census by kernel kind, and forward/backward per part."""

  total: Totals
  census: dict[str, Totals]
  parts: dict[str, dict[str, Totals]]  # part -> {"forward": ..., "backward": ...}


def analyse(text: str) -> Analysis:
  """The census and the breakdown of `compiled.as_text()`."""
  total, census, parts = Totals(), {}, {}
  for kernel in kernels(parse(text)):
    total.add(kernel)
    census.setdefault(kernel.kind, Totals()).add(kernel)
    direction = "backward" if is_backward(kernel) else "forward"
    parts.setdefault(part(kernel), {"forward": Totals(), "backward": Totals()})[direction].add(kernel)
  return Analysis(total, census, parts)

