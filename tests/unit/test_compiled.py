"""The hot session-core modules run compiled (mypyc) in a normal install, and a compiled module
older than its source is found before it hides an edit."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from endpoint_proxy import __version__, compiled
from endpoint_proxy.sessioncore import pg_pool

REPO = Path(__file__).resolve().parents[2]


def test_the_hot_path_modules_are_compiled_unless_the_build_was_asked_to_be_pure() -> None:
    # CI installs with scripts/bootstrap.sh: a build that silently fell back to the sources
    # would lose the CPU the benchmarks record, so this fails then.
    want = "pure" if os.environ.get("ENDPOINT_PROXY_PURE", "") not in ("", "0") else "compiled"
    assert compiled.status() == {m: want for m in compiled.COMPILED}
    for module in compiled.COMPILED:
        loaded = importlib.import_module(module).__file__ or ""
        assert loaded.endswith(".py") == (want == "pure"), loaded


def test_a_compiled_module_older_than_its_source_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for name in ("fresh", "old", "plain"):
        (pkg / f"{name}.py").write_text("X = 1\n")
    for name in ("fresh", "old"):
        (pkg / f"{name}{suffix}").write_bytes(b"")  # found, never loaded
    os.utime(pkg / "fresh.py", (1_000_000, 1_000_000))
    os.utime(pkg / f"old{suffix}", (1_000_000, 1_000_000))
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ("fakepkg.fresh", "fakepkg.old", "fakepkg.plain")
    # An installed wheel (no checkout around it): its files' times say nothing.
    assert compiled.status(modules) == {"fakepkg.fresh": "compiled", "fakepkg.old": "compiled", "fakepkg.plain": "pure"}
    # A checkout (editable install): an edited source makes its compiled module stale.
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    assert compiled.status(modules) == {"fakepkg.fresh": "compiled", "fakepkg.old": "stale", "fakepkg.plain": "pure"}


def test_the_version_line_says_how_the_proxy_was_built() -> None:
    out = subprocess.run([sys.executable, "-m", "endpoint_proxy", "--version"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout  # fmt: skip
    assert out.strip() == f"endpoint-proxy {__version__} ({compiled.summary()})"
    assert "stale" not in out


def test_prepared_statement_records_stay_shared_objects_when_compiled() -> None:
    # Compiled code copies a bare fixed-size tuple by value; the record is a class so that
    # thousands of sessions hold one object per statement.
    body = b"select 1 -- test_compiled\0\0\0"
    assert pg_pool.shared_statement(body) is pg_pool.shared_statement(bytes(body))


def test_the_build_pins_every_runtime_dependency_as_the_project_does() -> None:
    # mypyc compiles against the build environment's packages: the same pins as at run time,
    # so that the compiled code was typed against the trio it runs with.
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(doc["project"]["dependencies"]) <= set(doc["build-system"]["requires"])
    assert (
        next(r for r in doc["build-system"]["requires"] if r.startswith("mypy"))
        in doc["project"]["optional-dependencies"]["test"]
    )
