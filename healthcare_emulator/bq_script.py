"""BigQuery DML and multi-statement scripts over the emulator's warehouse.

What `jobs.insert` / `jobs.query` run when the query text is not a single SELECT:

- `DELETE [FROM] t [[AS] alias] WHERE cond` (a WHERE clause is required, as in BigQuery; `WHERE true`
  deletes every row);
- `INSERT [INTO] t [(col, ...)] SELECT ...` and `INSERT [INTO] t [(col, ...)] VALUES (...), ...`
  (columns not listed get NULL, or `[]` when REPEATED; a REQUIRED column left out is an error);
- `TRUNCATE TABLE t`;
- scripts: several statements separated by `;`, SELECTs included, optionally wrapped in
  `BEGIN [TRANSACTION]; ... COMMIT [TRANSACTION];` (or `ROLLBACK [TRANSACTION];`).

Parameters (`@name` or `?`, ARRAY<STRING> included, so `WHERE uid IN UNNEST(@uids)`) work as in
SELECTs. Tables named without a dataset resolve in `defaultDataset`.

Atomicity. Every statement, and every transaction as a whole, commits the way exports do: new
Parquet files are written under `staging/`, moved into the table folder, and the table's manifest is
replaced atomically (`Warehouse.commit_files_locked`). A failing statement (or a failing statement
inside a transaction, or a script that ends with a transaction still open) leaves the tables exactly
as they were before it (before the transaction); readers, which read one manifest, see the table
before or after, never in between. Outside a transaction each statement commits on its own (a later
failure does not undo an earlier statement), as in BigQuery.

Serialisation. The job takes, before its first statement, the locks an export's commit takes for
every table the script writes (`Warehouse.write_locks`: dataset locks shared, then table locks, in
sorted order) and holds them until it ends. An export writing one of those tables stages its files
meanwhile and commits after the job, on top of its result; a second DML job on the table waits.
Tables a script only reads are read from a snapshot (their manifest at the time of the statement).

DELETE rewrites only the data files that hold a deleted row: DuckDB evaluates the WHERE clause over
the table with each row's file and row number (`read_parquet(..., filename=..., file_row_number=true)`),
then each such file is copied without those rows, batch by batch; files with no deleted row are kept
as they are, and a file whose rows are all deleted is dropped. Deleting 1,000 rows spread over a
100,000-row table therefore touches at most the files that hold them.

Errors are BigQuery's: `notFound` for a missing table or dataset, `invalidQuery` for a bad
statement (unknown column: `Unrecognized name: X`; a column list that does not fit: `Inserted row
has wrong column count`; types that cannot be inserted; DELETE without WHERE; nested transactions).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .warehouse import (
    REWRITE_BATCH_ROWS,
    Warehouse,
    WarehouseError,
    _bq_field_from_duck,
    _check_dataset,
    _check_project,
    _check_table,
    _convert_value,
    _StagedWriter,
    in_unnest_as_subquery,
)

FILE_COL = "__emulator_dml_file__"
ROW_COL = "file_row_number"          # DuckDB's name for it
INSERT_CHUNK_ROWS = 10_000
_READ_RETRIES = 5


class DmlError(Exception):
    """A statement's failure as BigQuery reports it: rpc code name, message, error reason."""

    def __init__(self, code: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def _invalid(message: str) -> DmlError:
    return DmlError("INVALID_ARGUMENT", message, "invalidQuery")


@dataclass
class StatementResult:
    statement_type: str
    sql: str
    inserted: int = 0
    deleted: int = 0
    fields: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    tables: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def is_dml(self) -> bool:
        return self.statement_type in ("INSERT", "DELETE", "TRUNCATE_TABLE")

    @property
    def affected(self) -> int:
        return self.inserted + self.deleted


@dataclass
class ScriptResult:
    statements: list[StatementResult]
    script: bool          # more than one statement: the job is a SCRIPT with child jobs

    @property
    def statement_type(self) -> str:
        return "SCRIPT" if self.script else self.statements[0].statement_type

    @property
    def last(self) -> StatementResult:
        return self.statements[-1]


@dataclass
class _Table:
    """A written table's working state inside the job: its files as the job has changed them."""
    key: tuple[str, str, str]
    base: dict                          # the manifest the job started from (locked: still current)
    tdir: Path
    files: list[tuple[Path, dict]]      # committed state + this transaction's changes
    committed: list[tuple[Path, dict]]  # as of the last commit of this job
    changed: bool = False

    @property
    def schema(self) -> list[dict]:
        return self.base["schema"]

    @property
    def label(self) -> str:
        p, d, t = self.key
        return f"{p}:{d}.{t}"


def is_script_or_dml(statements: list) -> bool:
    from sqlglot import exp
    return len(statements) != 1 or not isinstance(statements[0], exp.Query)


def parse(sql: str) -> list:
    import sqlglot
    try:
        return [s for s in sqlglot.parse(sql, read="bigquery") if s is not None]
    except sqlglot.errors.SqlglotError as e:
        raise _invalid(f"Syntax error: {e}") from None


def statement_type(stmt) -> str:
    from sqlglot import exp
    if isinstance(stmt, exp.Query):
        return "SELECT"
    if isinstance(stmt, exp.Insert):
        return "INSERT"
    if isinstance(stmt, exp.Delete):
        return "DELETE"
    if isinstance(stmt, exp.TruncateTable):
        return "TRUNCATE_TABLE"
    if _is_begin(stmt):
        return "BEGIN_TRANSACTION"
    if isinstance(stmt, exp.Commit):
        return "COMMIT_TRANSACTION"
    if isinstance(stmt, exp.Rollback):
        return "ROLLBACK_TRANSACTION"
    if isinstance(stmt, exp.Update):
        return "UPDATE"
    if isinstance(stmt, exp.Merge):
        return "MERGE"
    return type(stmt).__name__.upper()


def _is_begin(stmt) -> bool:
    from sqlglot import exp
    return isinstance(stmt, exp.Transaction) or (
        isinstance(stmt, exp.Command) and str(stmt.this).upper() == "BEGIN"
        and not str(stmt.expression or "").strip())


class Script:
    """One job's statements, run in order against the warehouse."""

    def __init__(self, wh: Warehouse, sql: str, *, default_project: str, default_dataset: dict | None,
                 params: dict | list | None):
        self.wh = wh
        self.sql = sql
        self.default_project = default_project
        self.default_dataset = default_dataset or {}
        self.params = params
        self.statements = parse(sql)
        if not self.statements:
            raise _invalid("Query text is empty")
        self.tables: dict[tuple[str, str, str], _Table] = {}
        self.staging: Path | None = None
        self.in_tx = False

    # -- names ----------------------------------------------------------------------------------------
    def _qualify(self, tree) -> None:
        from sqlglot import exp
        ds = self.default_dataset.get("datasetId")
        ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        for t in tree.find_all(exp.Table):
            if isinstance(t.this, exp.Identifier) and not t.db and t.name.lower() not in ctes and ds:
                t.set("db", exp.to_identifier(ds))
                if self.default_dataset.get("projectId"):
                    t.set("catalog", exp.to_identifier(self.default_dataset["projectId"]))

    def _key(self, node) -> tuple[str, str, str]:
        name, db, catalog = node.name, node.db, node.catalog
        if not db:
            raise _invalid(f'Table "{name}" must be qualified with a dataset (e.g. dataset.table).')
        try:
            _check_dataset(db)
            _check_table(name)
            project = _check_project(catalog) if catalog else self.wh._resolve_project(db, self.default_project)
        except WarehouseError as e:
            raise DmlError(e.code, e.message, "notFound" if e.code == "NOT_FOUND" else "invalidQuery") from None
        return project, db, name

    @staticmethod
    def _target(stmt):
        from sqlglot import exp
        if isinstance(stmt, exp.Delete):
            node = stmt.this if isinstance(stmt.this, exp.Table) else (stmt.args.get("tables") or [None])[0]
        elif isinstance(stmt, exp.Insert):
            node = stmt.this.this if isinstance(stmt.this, exp.Schema) else stmt.this
        elif isinstance(stmt, exp.TruncateTable):
            node = (stmt.expressions or [None])[0]
        else:
            return None
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            raise _invalid(f"{statement_type(stmt)} needs a table name")
        return node

    # -- running --------------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> ScriptResult:
        for stmt in self.statements:
            self._qualify(stmt)
            kind = statement_type(stmt)
            if kind in ("UPDATE", "MERGE"):
                raise _invalid(f"{kind} statements are not supported by the local BigQuery emulator "
                               "(it runs SELECT, INSERT, DELETE, TRUNCATE TABLE and transactions).")
            if kind not in ("SELECT", "INSERT", "DELETE", "TRUNCATE_TABLE", "BEGIN_TRANSACTION",
                            "COMMIT_TRANSACTION", "ROLLBACK_TRANSACTION"):
                raise _invalid(f"Statement {kind} is not supported by the local BigQuery emulator "
                               "(it runs SELECT, INSERT, DELETE, TRUNCATE TABLE and transactions).")
        targets = []
        for stmt in self.statements:
            node = self._target(stmt)
            if node is not None:
                targets.append(self._key(node))
        script = len(self.statements) > 1
        if dry_run:
            for key in targets:
                self._snapshot(key)  # a missing table is an error in a dry run too
            return ScriptResult([StatementResult(statement_type(s), s.sql(dialect="bigquery"))
                                 for s in self.statements], script)
        results: list[StatementResult] = []
        try:
            with self.wh.write_locks(targets):
                for key in dict.fromkeys(targets):
                    m, tdir = self._snapshot(key)
                    files = [(tdir / f["name"], f) for f in m["files"]]
                    self.tables[key] = _Table(key, m, tdir, list(files), list(files))
                try:
                    for stmt in self.statements:
                        results.append(self._statement(stmt))
                    if self.in_tx:
                        raise _invalid("Transaction was never committed: the script ended inside "
                                       "BEGIN TRANSACTION without COMMIT TRANSACTION (rolled back).")
                except BaseException:
                    self._rollback()
                    raise
        except WarehouseError as e:
            raise DmlError(e.code, e.message, "notFound" if e.code == "NOT_FOUND" else None) from None
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
        return ScriptResult(results, script)

    def _snapshot(self, key):
        try:
            return self.wh.table_snapshot(*key)
        except WarehouseError as e:
            raise DmlError(e.code, e.message, "notFound" if e.code == "NOT_FOUND" else "invalidQuery") from None

    def _statement(self, stmt) -> StatementResult:
        kind = statement_type(stmt)
        res = StatementResult(kind, stmt.sql(dialect="bigquery"))
        if kind == "BEGIN_TRANSACTION":
            if self.in_tx:
                raise _invalid("Nested transactions are not supported: BEGIN TRANSACTION inside a transaction.")
            self.in_tx = True
        elif kind in ("COMMIT_TRANSACTION", "ROLLBACK_TRANSACTION"):
            if not self.in_tx:
                raise _invalid(f"{kind.replace('_', ' ')} without BEGIN TRANSACTION.")
            self.in_tx = False
            if kind == "COMMIT_TRANSACTION":
                self._commit()
            else:
                self._rollback()
        elif kind == "SELECT":
            res.fields, res.rows = self._select(stmt)
        else:
            node = self._target(stmt)
            key = self._key(node)
            res.tables = [key]
            t = self.tables[key]
            if kind == "DELETE":
                res.deleted = self._delete(stmt, node, t)
            elif kind == "TRUNCATE_TABLE":
                res.deleted = sum(e["numRows"] for _, e in t.files)
                if res.deleted:
                    t.files, t.changed = [], True
            else:
                res.inserted = self._insert(stmt, t)
            if not self.in_tx:
                self._commit()
        return res

    def _commit(self) -> None:
        for t in self.tables.values():
            if not t.changed:
                continue
            files = t.files
            if not files:  # a table without rows keeps one empty file carrying its schema
                files = self._write(t, [])
            self.wh.commit_files_locked(*t.key, t.base, files)
            t.base = self.wh.table_snapshot(*t.key)[0]
            t.files = [(t.tdir / e["name"], e) for e in t.base["files"]]
            t.committed = list(t.files)
            t.changed = False

    def _rollback(self) -> None:
        for t in self.tables.values():
            t.files = list(t.committed)
            t.changed = False

    # -- reading --------------------------------------------------------------------------------------
    def _stage(self) -> Path:
        if self.staging is None:
            self.staging = self.wh.new_staging_dir()
        return self.staging

    def _write(self, t: _Table, rows: list[dict]) -> list[tuple[Path, dict]]:
        writer = _StagedWriter(self._stage(), t.schema, t.label)
        try:
            for i in range(0, len(rows), INSERT_CHUNK_ROWS):
                writer.add_rows(rows[i:i + INSERT_CHUNK_ROWS])
            return [(self.staging / e["name"], e) for e in writer.finish()]
        except WarehouseError as e:
            writer.abort()
            raise _invalid(e.message) from None
        except BaseException:
            writer.abort()
            raise

    def _prepare(self, tree, target=None) -> tuple[str, dict]:
        """DuckDB SQL for `tree`, table references replaced by views; `target` (a Table node of the
        tree) becomes the view with each row's file and row number."""
        import sqlglot
        from sqlglot import exp
        ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        refs: dict[Any, str] = {}
        for node in list(tree.find_all(exp.Table)):
            if not isinstance(node.this, exp.Identifier):
                continue
            if not node.db and node.name.lower() in ctes:
                continue
            key = self._key(node)
            ref = ("pos", key) if node is target else ("plain", key)
            view = refs.setdefault(ref, f"__bq_table_{len(refs)}")
            alias = node.args.get("alias")
            name = node.name
            node.set("catalog", None)
            node.set("db", None)
            node.set("this", exp.to_identifier(view, quoted=True))
            if alias is None:
                node.set("alias", exp.TableAlias(this=exp.to_identifier(name, quoted=True)))
        if isinstance(tree, exp.Query):
            Warehouse._name_anonymous_columns(tree)
        in_unnest_as_subquery(tree)
        try:
            return tree.sql(dialect="duckdb"), refs
        except sqlglot.errors.SqlglotError as e:
            raise _invalid(str(e)) from None

    def _params_for(self, tree):
        from sqlglot import exp
        if self.params is None:
            return None
        if isinstance(self.params, dict):
            used = {p.name for p in tree.find_all(exp.Parameter)} | {
                p.name for p in tree.find_all(exp.Placeholder) if p.name}
            missing = sorted(used - set(self.params))
            if missing:
                raise _invalid(f"Query parameter '{missing[0]}' not found")
            return {k: v for k, v in self.params.items() if k in used}
        if len(self.statements) > 1:
            raise _invalid("Positional query parameters (?) are not supported in multi-statement scripts by the "
                           "local BigQuery emulator: use named parameters (@name).")
        return list(self.params)

    def _files_for(self, key) -> tuple[list[dict], list[str], bool]:
        """(schema, paths, locked) of a table as this job sees it."""
        t = self.tables.get(key)
        if t is not None:
            return t.schema, [str(p) for p, _ in t.files], True
        m, tdir = self._snapshot(key)
        return m["schema"], [str(tdir / f["name"]) for f in m["files"]], False

    def _run(self, tree, target=None) -> tuple[list[dict], list[tuple]]:
        import duckdb
        params = self._params_for(tree)
        duck_sql, refs = self._prepare(tree, target)
        for attempt in range(_READ_RETRIES):
            views = []
            for (kind, key), view in refs.items():
                t = self.tables.get(key)
                if t is not None and not t.files:  # every row deleted in this transaction
                    t.files = self._write(t, [])
                schema, paths, locked = self._files_for(key)
                views.append((view, schema, paths, kind == "pos", locked))
            try:
                return _run_duckdb(duckdb, duck_sql, params, views)
            except duckdb.Error as e:
                missing = any(not os.path.exists(p) for v in views for p in v[2] if not v[4])
                if missing and attempt + 1 < _READ_RETRIES:
                    continue
                raise _duck_error(e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _select(self, tree) -> tuple[list[dict], list[dict]]:
        fields, raw = self._run(tree)
        names = [f["name"] for f in fields]
        return fields, [dict(zip(names, r)) for r in raw]

    # -- DELETE ---------------------------------------------------------------------------------------
    def _delete(self, stmt, node, t: _Table) -> int:
        from sqlglot import exp
        where = stmt.args.get("where")
        if where is None:
            raise _invalid("DELETE must have a WHERE clause")
        names = {f["name"].lower() for f in t.schema}
        if FILE_COL.lower() in names or ROW_COL in names:
            raise _invalid(f"The local BigQuery emulator cannot DELETE from {t.label}: it has a column "
                           f"named {ROW_COL} or {FILE_COL}.")
        if not t.files:
            return 0
        sel = exp.Select(expressions=[exp.column(FILE_COL, quoted=True), exp.column(ROW_COL)])
        sel = sel.from_(node, copy=False).where(where.this, copy=False)
        _, raw = self._run(sel, target=node)
        doomed: dict[str, list[int]] = {}
        for path, row in raw:
            doomed.setdefault(path, []).append(row)
        if not doomed:
            return 0
        kept: list[tuple[Path, dict]] = []
        deleted = 0
        for path, entry in t.files:
            rows = doomed.get(str(path))
            if not rows:
                kept.append((path, entry))
                continue
            deleted += len(rows)
            if len(rows) < entry["numRows"]:
                kept.extend(self._rewrite_without(t, path, rows))
        t.files, t.changed = kept, True
        return deleted

    def _rewrite_without(self, t: _Table, path: Path, rows: list[int]) -> list[tuple[Path, dict]]:
        """Copy one data file into staging without the given row numbers, one batch at a time."""
        drop = pa.array(sorted(rows), type=pa.int64())
        writer = _StagedWriter(self._stage(), t.schema, t.label)
        try:
            offset = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=REWRITE_BATCH_ROWS):
                n = batch.num_rows
                numbers = pa.array(range(offset, offset + n), type=pa.int64())
                offset += n
                keep = pc.invert(pc.is_in(numbers, value_set=drop))
                part = batch.filter(keep)
                if part.num_rows:
                    if part.schema != writer.schema:
                        part = pa.RecordBatch.from_arrays(part.columns, schema=writer.schema)
                    writer.add_batch(part)
            return [(self.staging / e["name"], e) for e in writer.finish() if e["numRows"]]
        except BaseException:
            writer.abort()
            raise

    # -- INSERT ---------------------------------------------------------------------------------------
    def _insert(self, stmt, t: _Table) -> int:
        from sqlglot import exp
        by_lower = {f["name"].lower(): f for f in t.schema}
        if isinstance(stmt.this, exp.Schema):
            cols = []
            for ident in stmt.this.expressions:
                f = by_lower.get(ident.name.lower())
                if f is None:
                    raise _invalid(f"Column {ident.name} is not present in table {t.label}")
                if f in cols:
                    raise _invalid(f"INSERT has columns with duplicate name: {f['name']}")
                cols.append(f)
        else:
            cols = list(t.schema)
        source = stmt.expression
        if source is None:
            raise _invalid("INSERT needs a SELECT or VALUES")
        if isinstance(source, exp.Values):
            source = exp.select("*").from_(exp.Subquery(this=source, alias=exp.TableAlias(
                this=exp.to_identifier("__values"))))
        fields, raw = self._run(source)
        if len(fields) != len(cols):
            raise _invalid(f"Inserted row has wrong column count; Has {len(fields)}, {len(cols)} expected")
        for i, (src, dst) in enumerate(zip(fields, cols)):
            if not _insertable(src, dst) and any(r[i] not in (None, []) for r in raw):
                raise _invalid(f"Query column {i + 1} has type {_type_name(src)} which cannot be inserted "
                               f"into column {dst['name']}, which has type {_type_name(dst)}")
        missing_required = [f["name"] for f in t.schema if f["mode"] == "REQUIRED" and f not in cols]
        if missing_required and raw:
            raise _invalid(f"Required field {missing_required[0]} cannot be null")
        names = [c["name"] for c in cols]
        rows = [dict(zip(names, r)) for r in raw]
        if not rows:
            return 0
        t.files = t.files + self._write(t, rows)
        t.changed = True
        return len(rows)


def _type_name(f: dict) -> str:
    names = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}
    base = names.get(f["type"], f["type"])
    return f"ARRAY<{base}>" if f.get("mode") == "REPEATED" else base


_COERCE = {("INTEGER", "FLOAT"), ("INTEGER", "NUMERIC"), ("NUMERIC", "FLOAT"), ("STRING", "JSON")}


def _insertable(src: dict, dst: dict) -> bool:
    if (src.get("mode") == "REPEATED") != (dst.get("mode") == "REPEATED"):
        return False
    a, b = src["type"], dst["type"]
    return a == b or (a, b) in _COERCE or (a == "RECORD" and b == "RECORD")


def _run_duckdb(duckdb, duck_sql: str, params, views: list) -> tuple[list[dict], list[tuple]]:
    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        con.execute("SET TimeZone='UTC'")
        paths = [p for v in views for p in v[2]]
        if paths:
            con.execute(f"SET allowed_paths=[{', '.join(lit(p) for p in paths)}]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
        for view, schema, ps, with_position, _ in views:
            cols = []
            for f in schema:
                q = '"' + f["name"].replace('"', '""') + '"'
                if f["type"] == "JSON":
                    cols.append(f"CAST({q} AS {'JSON[]' if f['mode'] == 'REPEATED' else 'JSON'}) AS {q}")
                else:
                    cols.append(q)
            src = f"read_parquet([{', '.join(lit(p) for p in ps)}]"
            if with_position:
                cols += [f'"{FILE_COL}"', ROW_COL]
                src += f", filename={lit(FILE_COL)}, file_row_number=true"
            con.execute(f'CREATE VIEW "{view}" AS SELECT {", ".join(cols)} FROM {src})')
        cur = con.execute(duck_sql, params) if params is not None else con.execute(duck_sql)
        desc = cur.description or []
        raw = cur.fetchall()
    finally:
        con.close()
    fields = [_bq_field_from_duck(name, typ) for name, typ, *_ in desc]
    rows = [tuple(_convert_value(v, f) for v, f in zip(r, fields)) for r in raw]
    return fields, rows


def _duck_error(e: Exception) -> DmlError:
    msg = str(e)
    m = re.search(r'Referenced column "([^"]+)" not found', msg) or re.search(
        r'does not have a column named "([^"]+)"', msg)
    if m:
        return _invalid(f"Unrecognized name: {m.group(1)}")
    m = re.search(r"Table with name (\S+) does not exist", msg)
    if m:
        return DmlError("NOT_FOUND", f"Not found: Table {m.group(1)}", "notFound")
    first = msg.splitlines()[0] if msg else type(e).__name__
    return _invalid(first)
