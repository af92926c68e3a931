"""SQL that comes from outside segflow (``--where``, ``segflow query``), kept to the run.

A run is read through DuckDB, which can also read and write any file the process can,
install and load extensions, and change its own settings. Text from a user must not reach
any of that, so there are two defences, each enough on its own against reading the
machine's files:

- :func:`lock_down` closes a connection once the run's tables are registered in it: no file
  access (``COPY``, ``ATTACH``, ``read_text``, ``read_parquet``, globs), no extensions, no
  replacement scans of Python variables, and its settings locked, so no statement can open
  them again. Registered Arrow tables and datasets still scan: pyarrow reads them, not
  DuckDB.
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

import functools
import json
from collections.abc import Collection, Iterator
from typing import Any

import duckdb

# Scalar functions that report the session or the machine rather than compute on values.
# (getenv is the CLI's, not the Python package's: listed for builds that have it.)
_SESSION_FUNCTIONS = frozenset({"current_setting", "current_query", "getenv", "write_log"})
# The FROM clauses a subquery may have besides the run's tables (and those it combines).
_TABLE_REFS = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "EMPTY", "EXPRESSION_LIST"})
# Parse-tree keys that only locate text; the shape check ignores them.
_LOCATIONS = frozenset({"query_location", "query_location_length"})


def lock_down(db: duckdb.DuckDBPyConnection) -> None:
    """From here on ``db`` reads only what is registered in it, and no statement can change
    that (see the module docstring)."""
    db.execute("SET python_enable_replacements = false")
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


def _parse(statement: str) -> dict[str, Any]:
    with duckdb.connect() as db:
        [(serialised,)] = db.execute("SELECT json_serialize_sql($q)", {"q": statement}).fetchall()
    return json.loads(serialised)


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
    with duckdb.connect() as db:
        found = db.execute(
            "SELECT function_type, macro_definition FROM duckdb_functions() "
            "WHERE function_name = $name",
            {"name": name},
        ).fetchall()
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
