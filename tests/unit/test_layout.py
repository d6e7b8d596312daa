"""The layout's rules, read from the source (AST, function-level imports included): no import cycle among
main.py, config/ and handlers/; config imports nothing of handlers; the core imports no adapter, no
settings and no function module; adapters never read the settings (handlers/wiring.py passes them)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    out = {}
    for p in [ROOT / "main.py", *ROOT.glob("config/**/*.py"), *ROOT.glob("handlers/**/*.py")]:
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def test_no_import_cycles():
    graph = imports()
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            assert seen.get(t) != 1, f"import cycle: {' -> '.join(path + [m, t])}"
            if t not in seen:
                visit(t, path + [m])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [])


def test_layers():
    graph = imports()
    for m, targets in graph.items():
        if m.startswith("config"):
            assert not {t for t in targets if t.startswith("handlers")}, m
        if m.startswith("handlers.core"):
            allowed = ("handlers.core", "config.shapes")  # the name rules shared with the settings are pure
            assert not {t for t in targets if not t.startswith(allowed) and t != "handlers"}, (m, targets)
        if m.startswith("handlers.adapters"):
            assert not {t for t in targets if t.startswith(("config", "handlers.wiring", "handlers.intake",
                                                            "handlers.poller", "handlers.ingest",
                                                            "handlers.status"))}, (m, targets)
