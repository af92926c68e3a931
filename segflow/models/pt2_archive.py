"""Refusing a ``.pt2`` archive that would run code when ``torch.export.load`` reads it.

A ``.pt2`` is a zip of JSON (the graph, the weights' layout) and raw tensor bytes, and
nothing in that much runs code. But ``torch.export.load`` also honours entries that do
(torch 2.14, ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde``):

- weights or tensor constants marked ``"use_pickle": true`` in their payload config,
  read with ``torch.load(weights_only=False)``: a full unpickle;
- custom objects (``custom_obj_*``, TorchScript's unpickler) and opaque objects
  (``opaque_obj_*``, ``pickle.loads``) among the constants;
- the legacy whole-state-dict files (``data/weights/<model>.pt``, ``data/constants/<model>.pt``)
  and the pre-2.8 layout (``serialized_*.pt`` at the top), and the sample inputs
  (``data/sample_inputs/<model>.pt``): ``torch.load(weights_only=True)``, retried with
  ``weights_only=False`` when that fails;
- AOTInductor packages (``data/aotinductor/``): compiled shared libraries, loaded;
- the program's ``guards_code``: Python source, ``exec``'d when the module is built;
- every symbolic shape (``expr_str``), parsed by ``sympy.sympify``, which ``eval``'s it.

:func:`check_pt2` reads the archive's bytes and refuses all of these: it accepts only the
entries a plain exported program needs (an allowlist, so a new kind of entry is refused
rather than missed), payloads stored as raw tensors, sample inputs that load weights-only
(so torch's first attempt succeeds and its fallback never runs), guards and shape
expressions made of arithmetic on input sizes and sympy constructors only, and graph nodes
calling ATen or symbolic-size operators only. The caller loads the very bytes it checked.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from segflow.models.errors import UnsafeModelError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# The entries of an exported program's archive, under its one top folder ({m}: a model).
_ALLOWED_ENTRIES = tuple(
    re.compile(pattern)
    for pattern in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        rf"models/{_NAME}\.json",
        rf"data/weights/{_NAME}_weights_config\.json",
        r"data/weights/weight_[0-9]+",
        rf"data/constants/{_NAME}_constants_config\.json",
        r"data/constants/tensor_[0-9]+",
        rf"data/sample_inputs/{_NAME}\.pt",
        r"extra/[A-Za-z0-9_.-]+",  # read as text only
    )
)
_PAYLOAD_NAMES = {
    "weights": re.compile(r"weight_[0-9]+"),
    "constants": re.compile(r"tensor_[0-9]+"),
}
_GRAPH_TARGET = re.compile(
    rf"torch\.ops\.aten\.{_NAME}\.{_NAME}|_operator\.{_NAME}|math\.{_NAME}|torch\.sym_{_NAME}"
)

# Guards read input sizes (``L['x'].size()[2]``) and compare arithmetic on them, calling
# only these functions of the namespace torch runs them in.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset"})
_GUARD_FUNCTIONS = frozenset(
    {
        *("torch.sym_max", "torch.sym_min", "torch.sym_int", "torch.sym_float"),
        *("torch.sym_not", "torch.sym_ite", "math.floor", "math.ceil", "math.trunc"),
        *("math.sqrt", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"),
    }
)
# What torch writes into a shape expression (sympy's srepr): constructors of numbers,
# symbols, arithmetic, comparisons, logic, and torch's own integer functions.
_SYMPY_FUNCTIONS = frozenset(
    {
        *("Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min"),
        *("Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"),
        *("Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan"),
        *("GreaterThan", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv"),
        *("CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow"),
        *("FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat"),
        *("TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "OpaqueUnaryFn_sqrt"),
        *("BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity"),
    }
)
_SYMPY_CONSTANTS = frozenset({"True", "False", "oo", "zoo", "nan", "int_oo"})
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_SAFE_STRING = re.compile(rf"{_NAME}|[0-9.eE+-]+")
_ARITHMETIC = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    *(ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE),
)


def check_pt2(data: bytes, source: Path) -> None:
    """Raise :class:`UnsafeModelError` unless loading ``data`` (the bytes of the ``.pt2``
    file ``source``) with ``torch.export.load`` runs nothing the archive carries."""
    refuse = _Refusal(source)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as error:
        raise refuse(f"is not a .pt2 archive (a zip file): {error}") from error
    if len(set(names)) != len(names):
        # Python's zip reader and torch's could pick different copies of a duplicate.
        raise refuse("has duplicate entries")
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or not all("/" in name for name in names):
        raise refuse(f"must hold one top folder, holds {sorted(roots)[:5]}")
    (root,) = roots
    for name in names:
        entry = name[len(root) + 1 :]
        if not any(pattern.fullmatch(entry) for pattern in _ALLOWED_ENTRIES):
            raise refuse(
                f"holds {entry!r}, which is not part of a plain exported program (pickled "
                f"objects, compiled code and legacy pickled state dicts are refused)"
            )
    for name in names:
        entry = name[len(root) + 1 :]
        if entry.endswith("_weights_config.json"):
            _check_payloads(archive.read(name), "weights", entry, refuse)
        elif entry.endswith("_constants_config.json"):
            _check_payloads(archive.read(name), "constants", entry, refuse)
        elif entry.startswith("data/sample_inputs/"):
            _check_weights_only(archive.read(name), entry, refuse)
        elif entry.startswith("models/"):
            _check_program(archive.read(name), entry, refuse)


class _Refusal:
    def __init__(self, source: Path) -> None:
        self.source = source

    def __call__(self, problem: str) -> UnsafeModelError:
        return UnsafeModelError(
            f"model file {self.source} {problem}; refusing to load it (segflow loads plain "
            f"exported programs only, which carry no code to run)"
        )


def _check_payloads(raw: bytes, kind: str, entry: str, refuse: _Refusal) -> None:
    config = _json(raw, entry, refuse).get("config")
    if not isinstance(config, dict):
        raise refuse(f"has no payload table in {entry!r}")
    for fqn, payload in config.items():
        if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
            raise refuse(f"stores {kind[:-1]} {fqn!r} as a pickle ({entry!r})")
        path_name = payload.get("path_name")
        if not isinstance(path_name, str) or not _PAYLOAD_NAMES[kind].fullmatch(path_name):
            raise refuse(f"stores {kind[:-1]} {fqn!r} in {path_name!r}, not a raw tensor")


def _check_weights_only(raw: bytes, entry: str, refuse: _Refusal) -> None:
    if not raw:
        return
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:
        raise refuse(f"holds {entry!r}, which is not weights-only: {error}") from error


def _check_program(raw: bytes, entry: str, refuse: _Refusal) -> None:
    program = _json(raw, entry, refuse)
    guards = program.get("guards_code", [])
    if not isinstance(guards, list):
        raise refuse(f"has a malformed guards_code in {entry!r}")
    for guard in guards:
        if not (isinstance(guard, str) and _is_size_guard(guard)):
            raise refuse(f"has a guard that is not arithmetic on input sizes: {guard!r}")
    for key, value in _items(program):
        if key == "expr_str" and not (isinstance(value, str) and _is_shape_expression(value)):
            raise refuse(f"has a shape expression that is not a sympy expression: {value!r}")
        if key == "target" and isinstance(value, str) and not _GRAPH_TARGET.fullmatch(value):
            raise refuse(f"calls {value!r}, which is not an ATen or symbolic-size operator")


def _json(raw: bytes, entry: str, refuse: _Refusal) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"has an unreadable {entry!r}: {error}") from error
    if not isinstance(value, dict):
        raise refuse(f"has a malformed {entry!r}")
    return value


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of every object nested in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            yield from item.items()
        elif isinstance(item, list):
            stack.extend(item)


def _parse(expression: str) -> ast.AST | None:
    try:
        return ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None


def _is_size_guard(guard: str) -> bool:
    # torch pastes the guard into a double-quoted message of the code it generates.
    if any(character in guard for character in '"\\\n'):
        return False
    tree = _parse(guard)
    return tree is not None and _guard_node(tree)


def _guard_node(node: ast.AST) -> bool:
    match node:
        case ast.Expression(body=body):
            return _guard_node(body)
        case ast.BinOp(left=left, op=op, right=right):
            return isinstance(op, _ARITHMETIC) and _guard_node(left) and _guard_node(right)
        case ast.UnaryOp(op=op, operand=operand):
            return isinstance(op, _ARITHMETIC) and _guard_node(operand)
        case ast.BoolOp(values=values):
            return all(_guard_node(value) for value in values)
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            return all(isinstance(op, _ARITHMETIC) for op in ops) and all(
                _guard_node(part) for part in (left, *comparators)
            )
        case ast.Constant(value=value):
            return _plain_constant(value)
        case ast.Name(id="L"):  # the inputs
            return True
        case ast.Subscript(value=value, slice=index):
            return _guard_node(value) and _guard_node(index)
        case ast.Call(func=ast.Attribute(value=value, attr=attr), args=args, keywords=[]) if (
            attr in _GUARD_METHODS
        ):
            return _guard_node(value) and all(_guard_node(arg) for arg in args)
        case ast.Call(func=function, args=args, keywords=[]) if (
            _dotted(function) in _GUARD_FUNCTIONS
        ):
            return all(_guard_node(arg) for arg in args)
    return False


def _dotted(node: ast.AST) -> str | None:
    match node:
        case ast.Name(id=name):
            return name
        case ast.Attribute(value=ast.Name(id=name), attr=attr):
            return f"{name}.{attr}"
    return None


def _is_shape_expression(expression: str) -> bool:
    tree = _parse(expression)
    return tree is not None and all(_shape_node(node) for node in ast.walk(tree))


def _shape_node(node: ast.AST) -> bool:
    match node:
        case ast.Expression() | ast.BinOp() | ast.UnaryOp() | ast.BoolOp() | ast.Compare():
            return True
        case ast.Load() | ast.keyword():
            return True
        case ast.Constant(value=value):
            return _plain_constant(value)
        case ast.Name(id=name):
            return (
                name in _SYMPY_FUNCTIONS
                or name in _SYMPY_CONSTANTS
                or bool(_SYMBOL.fullmatch(name))
            )
        case ast.Call(func=ast.Name(id=name)):
            return name in _SYMPY_FUNCTIONS
    return isinstance(node, _ARITHMETIC)


def _plain_constant(value: object) -> bool:
    """Numbers, booleans, names and numerals (``Float('0.5')``): no string that could become
    code or break a quote."""
    if isinstance(value, str):
        return _SAFE_STRING.fullmatch(value) is not None
    return isinstance(value, bool | int | float)
