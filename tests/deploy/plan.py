"""deploy.sh's --dry-run plan as argument vectors, read back by bash itself (as a user pasting a line would)."""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy.sh"

# "+ CMD" runs, "? CMD" is a lookup, "+ [if absent] CMD" etc. run according to the lookup before them
LINE = re.compile(r"^(?P<kind>[+?])(?: \[if (?P<cond>absent|present|deleted)\])? (?P<cmd>(?:gcloud|bq) .*)$")

# bash reads each printed line back into words exactly as it would if the user pasted it
_UNQUOTE = r'''while IFS= read -r line; do eval "set -- $line"; printf '%s\0' "$#" "$@"; done'''


@dataclass(frozen=True)
class Step:
    kind: str            # "+" (a command) or "?" (a read-only lookup)
    cond: str | None     # None (always), "absent", "present" or "deleted"
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def unquote(lines: list[str]) -> list[tuple[str, ...]]:
    r = subprocess.run(["bash", "-c", _UNQUOTE], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=30, check=True)
    words = r.stdout.split("\0")[:-1]
    out, i = [], 0
    while i < len(words):
        n = int(words[i])
        out.append(tuple(words[i + 1:i + 1 + n]))
        i += 1 + n
    assert len(out) == len(lines)
    return out


@dataclass
class Plan:
    stdout: str
    stderr: str
    steps: list[Step]
    files: dict[str, str]  # "env", "lifecycle": the printed contents of the files the commands name

    @property
    def commands(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "+"]


def dry_run(*args: str, env: dict | None = None, tmpdir: str | None = None) -> Plan:
    """deploy.sh --dry-run with a `gcloud` and a `bq` first on PATH that record any call: none may happen."""
    with tempfile.TemporaryDirectory() as tmp:
        called = Path(tmp) / "called"
        for name in ("gcloud", "bq"):
            fake = Path(tmp) / name
            fake.write_text(f'#!/bin/sh\necho "{name} $*" >> {called}\nexit 1\n')
            fake.chmod(0o755)
        r = subprocess.run(["bash", str(DEPLOY), "--dry-run", *args], capture_output=True, text=True,
                           env={"PATH": f"{tmp}:/usr/bin:/bin", "TMPDIR": tmpdir or tmp, **(env or {})},
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert not called.exists(), f"--dry-run ran a command: {called.read_text()}"
    lines = r.stdout.splitlines()
    matched = [(m, line) for line in lines if (m := LINE.match(line))]
    # every line that looks like a command is one of the forms above
    odd = [line for line in lines if line.startswith(("+ ", "? ")) and not line.startswith("+ (")
           and not LINE.match(line)]
    assert not odd, odd
    argvs = unquote([m["cmd"] for m, _ in matched])
    steps = [Step(m["kind"], m["cond"], argv) for (m, _), argv in zip(matched, argvs)]
    files = {}
    for key, title in (("env", "+ (env file for every function)"), ("lifecycle", "+ (lifecycle file)")):
        if title in lines:
            body = []
            for line in lines[lines.index(title) + 1:]:
                if not line.startswith("    "):
                    break
                body.append(line[4:])
            files[key] = "\n".join(body) + "\n"
    return Plan(r.stdout, r.stderr, steps, files)
