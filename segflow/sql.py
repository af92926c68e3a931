"""SQL that comes from outside segflow (``--where``, ``segflow query``), kept to the run.

A run is read through DuckDB, which can also read and write any file the process can,
install and load extensions, and change its own settings. Text from a user must not reach
any of that, so there are two defences, each enough on its own against reading the
machine's files:

- :func:`lock_down` closes a connection once the run's tables are in it: no file access
  (``COPY``, ``ATTACH``, ``read_text``, ``read_parquet``, globs) but to the files it is given,
  no extensions, no replacement scans of Python variables, and its settings locked, so no
  statement can open them again. Registered Arrow tables still scan. The files it is given
  are those :func:`expose_files` names: DuckDB's ``allowed_paths`` admit writes as well as
  reads, so a run's files are allowed only under ``segflow-run://`` names, served read-only
  by a file system that knows those files and no other (``COPY ... TO`` one of them fails,
  and their plain paths stay refused). That file system is Python, which each of DuckDB's
  reads crosses into (a second more for a scan of a million images' masks): a connection
  that will run nothing but segflow's own SQL and, from outside, SELECT statements
  (:func:`only_selects`), none of which writes a file, is given a local run's files by
  their paths instead, and reads them natively. ``COPY ... TO`` or ``ATTACH`` one of them
  would succeed there: no other statement from outside may reach such a connection
  (``segflow query`` gives any other SQL a connection through the read-only file system).
- :func:`predicate_problem` admits a predicate (``--where``) only if DuckDB's own parser
  reads ``SELECT * FROM <table> WHERE (<predicate>)`` (:func:`select_where`, the statement
  that then runs, verbatim) as exactly one ``SELECT`` of that shape, so the text is one
  expression: not a second statement, not a clause. Inside the expression, subqueries may
  read only the run's tables, and functions are DuckDB's built-in scalar, aggregate and
  window functions, less those that report the session (``current_setting``); a table
  function (``read_text``, ``glob``, ``query``) or an unknown function is refused, and so is
  a macro whose body would be.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import fsspec
from fsspec.implementations.local import LocalFileSystem

# Scalar functions that report the session or the machine rather than compute on values.
# (getenv is the CLI's, not the Python package's: listed for builds that have it.)
_SESSION_FUNCTIONS = frozenset({"current_setting", "current_query", "getenv", "write_log"})
# The FROM clauses a subquery may have besides the run's tables (and those it combines).
_TABLE_REFS = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "EMPTY", "EXPRESSION_LIST"})
# Parse-tree keys that only locate text; the shape check ignores them.
_LOCATIONS = frozenset({"query_location", "query_location_length"})
# The characters that make DuckDB read a path as a glob.
_GLOB = re.compile(r"[*?\[]")


RUN_PROTOCOL = "segflow-run"


class _ReadOnlyFiles(fsspec.AbstractFileSystem):
    """Some files of another fsspec file system, read-only, under ``segflow-run://<path>``:
    the only way a locked connection reaches a run's files. Their details are listed once a
    folder (one listing, not a request a file, on object stores)."""

    protocol = RUN_PROTOCOL
    root_marker = ""
    cachable = False

    def __init__(self, fs: fsspec.AbstractFileSystem, tables: Mapping[str, Sequence[str]]):
        super().__init__()
        self._fs = fs
        # A table's files under one glob, <table>/*.parquet: DuckDB binds a view over
        # thousands of files with one call here, not one a file.
        self._tables = {f"{name}/*.parquet": list(paths) for name, paths in tables.items()}
        self._details: dict[str, dict[str, Any] | None] = {
            path: None for paths in tables.values() for path in paths
        }

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return path.removeprefix(f"{RUN_PROTOCOL}://")

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        # fsspec's open less its text modes, compression and transactions: DuckDB opens each
        # file twice a scan, thousands of files a query, so every call here counts.
        return self._open(path, mode)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any):
        path = self._known(path)
        if mode != "rb":
            raise PermissionError(f"{path}: a run's tables are read-only here")
        size = self._info(path)["size"]
        if isinstance(self._fs, LocalFileSystem):
            fd = os.open(path, os.O_RDONLY)
            return _PositionalFile(lambda start, n: os.pread(fd, n, start), size, fd)
        fs = self._fs
        return _PositionalFile(lambda start, n: fs.cat_file(path, start=start, end=start + n), size)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._info(self._known(path))

    def size(self, path: str) -> int:
        return self._info(self._known(path))["size"]

    def modified(self, path: str) -> datetime.datetime:
        path = self._known(path)
        details = self._info(path)
        return details.get("modified") or details.get("LastModified") or self._fs.modified(path)

    def _info(self, path: str) -> dict[str, Any]:
        """The details of a file of the run (``path`` stripped and known)."""
        details = self._details[path]
        if details is not None:
            return details
        if isinstance(self._fs, LocalFileSystem):
            # One stat: fsspec's own info costs ten times that, on thousands of files.
            found = os.stat(path)
            modified = datetime.datetime.fromtimestamp(found.st_mtime, datetime.UTC)
            details = {"name": path, "size": found.st_size, "type": "file", "modified": modified}
            self._details[path] = details
            return details
        folder = path.rsplit("/", 1)[0]
        for entry in self._fs.ls(folder, detail=True):
            name = self._fs._strip_protocol(entry["name"])
            if name in self._details:
                self._details[name] = entry | {"name": name}
        if self._details[path] is None:
            raise FileNotFoundError(path)
        return self._details[path]

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._strip_protocol(path) in self._details

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        return [self.info(path) if detail else self._known(path)]

    def glob(self, path: str, **kwargs: Any) -> list[str]:
        path = self._strip_protocol(path)
        if path in self._tables:
            return [f"{RUN_PROTOCOL}://{p}" for p in self._tables[path]]
        # A file's name is read as it is, even one holding a glob's characters.
        return [f"{RUN_PROTOCOL}://{path}"] if path in self._details else []

    def _known(self, path: str) -> str:
        path = self._strip_protocol(path)
        if path not in self._details:
            raise PermissionError(f"{path} is not a table file of the run")
        return path


class _PositionalFile(io.RawIOBase):
    """A file that DuckDB's threads read at once. DuckDB reads a row group as ``seek`` then
    ``read`` on the one handle of its file, from whichever thread scans it: on a shared
    position, a compacted file's row groups, scanned by several threads, read each other's
    bytes (ZSTD fails, or worse). So each thread has its own position, and every read is
    positional: ``pread`` on a local disk, a ranged request on an object store."""

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, fd: int | None = None):
        super().__init__()
        self._read_at, self._size, self._fd = read_at, size, fd
        self._position = threading.local()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return getattr(self._position, "at", 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._size}[whence]
        self._position.at = base + offset
        return self._position.at

    def read(self, size: int = -1) -> bytes:
        start = self.tell()
        size = self._size - start if size is None or size < 0 else min(size, self._size - start)
        if size <= 0:
            return b""
        data = self._read_at(start, size)
        self._position.at = start + len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fd is not None and not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True)
class TableFiles:
    """One table's files as a connection reads them (:func:`expose_files`)."""

    files: tuple[str, ...]  # each file, by the name the connection reads it by
    glob: str | None  # the one name of them all, or None: they are read as a list
    variable: str | None = None  # the connection's variable holding that list, or None

    def source(self) -> str:
        """SQL: what ``read_parquet`` reads them all by."""
        if self.glob:
            return sql_string(self.glob)
        if self.variable:
            return f"getvariable({sql_string(self.variable)})"
        return sql_list(self.files)

    def readable(self) -> list[str]:
        """The names :func:`lock_down` is to allow."""
        return [self.glob, *self.files] if self.glob else list(self.files)


def expose_files(
    db: duckdb.DuckDBPyConnection,
    fs: fsspec.AbstractFileSystem,
    tables: Mapping[str, Sequence[str]],
    *,
    natively: bool = False,
) -> dict[str, TableFiles]:
    """Let ``db`` read the files of ``tables`` (fsspec URLs on ``fs``, by table; a table
    without files gets none) and write none of them: through the read-only file system,
    under ``segflow-run://`` names and the glob ``segflow-run://<table>/*.parquet`` of each
    table's, or, with ``natively`` (``db`` will run SELECT statements only, see the module's
    doc), by their local paths when ``fs`` is a local disk, which ``db``'s variables
    ``segflow_files_<k>`` hold."""
    # What fsspec's _strip_protocol makes of an fsspec URL, without its cost a file.
    paths = {name: [url.split("://", 1)[-1] for url in urls] for name, urls in tables.items()}
    every = [path for listed in paths.values() for path in listed]
    # DuckDB would read a path holding a glob's characters as a pattern.
    if natively and isinstance(fs, LocalFileSystem) and not any(map(_GLOB.search, every)):
        # A list of files in a view's SQL is parsed and bound as an expression a file, which
        # the view keeps (1M images: 3,900 files, 45 MB for masks); in a variable it is a
        # value, bound when a query reads it.
        exposed = {}
        for index, (name, listed) in enumerate(paths.items()):
            variable = f"segflow_files_{index}" if listed else None
            if variable:
                db.execute(f"SET VARIABLE {variable} = $files", {"files": listed})
            exposed[name] = TableFiles(tuple(listed), None, variable)
        return exposed
    db.register_filesystem(_ReadOnlyFiles(fs, paths))
    return {
        name: TableFiles(
            tuple(f"{RUN_PROTOCOL}://{p}" for p in listed),
            f"{RUN_PROTOCOL}://{name}/*.parquet" if listed else None,
        )
        for name, listed in paths.items()
    }


def only_selects(sql: str) -> bool:
    """Whether ``sql`` is one or more statements that DuckDB's parser reads as ``SELECT``
    (``SHOW``, ``DESCRIBE``, ``SUMMARIZE``, ``VALUES``, ``FROM masks`` and set operations
    among them; not ``EXPLAIN``, which may run another statement, nor ``PRAGMA``, ``CALL``,
    ``COPY``, ``ATTACH``, ``CREATE``, ...): statements that write no file, and whose table
    functions (``query()``) run SELECT statements only."""
    try:
        statements = _parser().extract_statements(sql)
    except duckdb.Error:
        return False
    return bool(statements) and all(s.type == duckdb.StatementType.SELECT for s in statements)


def sql_string(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: Iterable[str]) -> str:
    """``values`` as an SQL list of string literals."""
    return "[" + ", ".join(map(sql_string, values)) + "]"


def lock_down(db: duckdb.DuckDBPyConnection, readable: Collection[str] = ()) -> None:
    """From here on ``db`` reads only what is registered in it and the files ``readable``
    names (from :func:`expose_files`), and no statement can change that (see the module
    docstring)."""
    db.execute("SET python_enable_replacements = false")
    if readable:
        db.execute("SET allowed_paths = $paths", {"paths": list(readable)})
    db.execute("SET enable_external_access = false")
    db.execute("SET lock_configuration = true")


def select_where(predicate: str, table: str) -> str:
    """The statement a predicate runs as. Its own lines, so that a ``--`` comment in it ends
    at its end and cannot swallow the closing parenthesis."""
    return f"SELECT * FROM {table} WHERE (\n{predicate}\n)"


def predicate_problem(predicate: str, table: str, tables: Collection[str]) -> str | None:
    """Why ``predicate`` is not one expression over ``table`` whose subqueries read only
    ``tables``, in a few words naming the part refused; ``None`` when it is."""
    if not predicate.strip():
        return "it is empty"
    parsed = _parse(select_where(predicate, table))
    if parsed.get("error"):
        message = parsed.get("error_message", "")
        if parsed.get("error_type") == "parser":
            return f"it does not parse ({message})"
        if "Only SELECT statements" in message:
            return "a statement other than SELECT follows it"
        return f"it cannot be checked ({message})"
    statements = parsed["statements"]
    if len(statements) != 1:
        return f"it is {len(statements)} statements"
    node = statements[0]["node"]
    if _shape(node) != _scaffold(table) or node["where_clause"] is None:
        return "it is not one expression (it ends the parenthesis it is put in)"
    allowed = {name.lower() for name in tables}
    for part in _nodes(node["where_clause"]):
        problem = _refused(part, allowed)
        if problem:
            return problem
    return None


def has_subquery(predicate: str, table: str) -> bool:
    """Whether ``predicate`` (one that :func:`predicate_problem` admits) holds a subquery."""
    where = _parse(select_where(predicate, table))["statements"][0]["node"]["where_clause"]
    return any(part.get("class") == "SUBQUERY" for part in _nodes(where))


def tables_named(sql: str, tables: Collection[str]) -> set[str]:
    """Which of ``tables`` the SQL reads, as DuckDB's parser finds them in its statements'
    FROM clauses, subqueries' included: all of them unless every statement is a ``SELECT``
    that names some of them and calls no table function (``query_table('masks')``,
    ``duckdb_tables()``) that could read any."""
    every = set(tables)
    parsed = _parse(sql)
    if parsed.get("error"):  # e.g. not a SELECT: SHOW TABLES, DESCRIBE masks
        return every
    by_name = {name.lower(): name for name in tables}
    named = set()
    for part in _nodes(parsed["statements"]):
        if part.get("type") == "TABLE_FUNCTION" and "function" in part:
            return every
        if part.get("type") == "BASE_TABLE" and "table_name" in part:
            name = by_name.get(part["table_name"].lower())
            if name is not None:
                named.add(name)
    return named or every


def _parse(statement: str) -> dict[str, Any]:
    [(serialised,)] = (
        _parser().execute("SELECT json_serialize_sql($q)", {"q": statement}).fetchall()
    )
    return json.loads(serialised)


_parsers = threading.local()


def _parser() -> duckdb.DuckDBPyConnection:
    """A connection of this thread's that only parses (and reads DuckDB's own catalog of
    functions): a new connection costs tens of milliseconds, and a predicate is parsed
    several times over."""
    if getattr(_parsers, "db", None) is None:
        _parsers.db = duckdb.connect()
    return _parsers.db


def _shape(value: Any) -> Any:
    """The parse tree without the predicate and without text positions."""
    if isinstance(value, dict):
        return {
            k: _shape(v) for k, v in value.items() if k not in _LOCATIONS and k != "where_clause"
        }
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


@functools.cache
def _scaffold(table: str) -> Any:
    return _shape(_parse(select_where("TRUE", table))["statements"][0]["node"])


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    """Every object of a parse tree, outermost first."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _nodes(child)
    elif isinstance(value, list):
        for child in value:
            yield from _nodes(child)


def _refused(part: dict[str, Any], tables: set[str]) -> str | None:
    kind = part.get("type")
    if part.get("class") in ("FUNCTION", "WINDOW"):
        return _function_problem(part["function_name"], part["schema"] or part["catalog"])
    if part.get("class") == "PARAMETER":
        return "it has a parameter placeholder"
    if "class" in part or "sample" not in part or "alias" not in part:
        return None  # an expression or a clause; only table references remain
    if kind == "TABLE_FUNCTION":
        return f"{part['function']['function_name']}(...) is a table function"
    if kind not in _TABLE_REFS:
        return f"a subquery may read the run's tables only, not {kind}"
    if kind == "BASE_TABLE":
        name = part["table_name"]
        if part["schema_name"] or part["catalog_name"] or name.lower() not in tables:
            qualified = ".".join(p for p in (part["catalog_name"], part["schema_name"], name) if p)
            return f"{qualified} is not a table of the run ({', '.join(sorted(tables))})"
    return None


@functools.cache
def _function_problem(name: str, qualifier: str) -> str | None:
    if qualifier:
        return f"{qualifier}.{name}(...) is not a built-in function"
    name = name.lower()
    found = (
        _parser()
        .execute(
            "SELECT function_type, macro_definition FROM duckdb_functions() "
            "WHERE function_name = $name",
            {"name": name},
        )
        .fetchall()
    )
    kinds = {kind for kind, _ in found}
    if not kinds:
        return f"{name}(...) is not a built-in function"
    if kinds & {"table", "table_macro", "pragma"}:
        return f"{name}(...) is a table function"
    if name in _SESSION_FUNCTIONS:
        return f"{name}(...) reads the session, not the run"
    for kind, body in found:
        # A built-in macro is an expression over its parameters; one that reads a table
        # (pg_get_viewdef: duckdb_views()) would read the session.
        if kind == "macro" and predicate_problem(body, "images", ()):
            return f"{name}(...) is a macro over more than its arguments"
    return None
