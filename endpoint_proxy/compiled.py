"""The modules built as C extensions by mypyc (``setup.py``), and whether this install has them.

Every transaction of every pooled session runs through these: the sans-IO session core, and
the pools' borrow and give-back with the per-request bookkeeping (gate, latency, session env).
Compiled, the proxy spends markedly less CPU per transaction (benchmarks/RESULTS.md). The
Python sources stay the reference: a build with ``ENDPOINT_PROXY_PURE=1`` runs them as they
are. A compiled module shadows its source, so a source edited after the build is "stale" until
``scripts/bootstrap.sh`` (or ``pip install -e .``) builds it again.

What belongs here: modules whose classes interpreted code neither subclasses nor patches
(compiled classes refuse both), whose annotations say the runtime types (compiled code checks
them), and that are on the per-transaction path. Compiling the session shells and the hub was
tried and measured no gain: their cost is the socket calls and the interpreted subclasses.
This file imports nothing of the package, so ``setup.py`` reads the list without importing it.
"""

from __future__ import annotations

import importlib.util
import os

COMPILED: tuple[str, ...] = (
    "endpoint_proxy.protocol.pg.framing",
    "endpoint_proxy.sessioncore.actions",
    "endpoint_proxy.sessioncore.pg_pool",
    "endpoint_proxy.sessioncore.pg",
    "endpoint_proxy.drills.latency",
    "endpoint_proxy.server.gate",
    "endpoint_proxy.server.session.env",
    "endpoint_proxy.server.pool",
    "endpoint_proxy.server.pools",
)


def source_path(module: str) -> str:
    """The module's source file, relative to the project root (what mypyc is given)."""
    return module.replace(".", "/") + ".py"


def _in_checkout(origin: str, module: str) -> bool:
    """Whether the compiled file sits in a source checkout (an editable install), where an
    edit can make it stale. An installed wheel's files all carry its install time."""
    root = os.path.dirname(origin)
    for _ in range(module.count(".")):
        root = os.path.dirname(root)
    return os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(root, "pyproject.toml"))


def status(modules: tuple[str, ...] = COMPILED) -> dict[str, str]:
    """Each module: "compiled", "pure" (its source runs) or "stale" (in a checkout, compiled
    from an older source than the one beside it). Nothing is imported."""
    out: dict[str, str] = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin is None or origin.endswith(".py"):
            out[module] = "pure"
            continue
        source = os.path.join(os.path.dirname(origin), module.rsplit(".", 1)[1] + ".py")
        try:
            stale = _in_checkout(origin, module) and os.path.getmtime(source) > os.path.getmtime(origin)
        except OSError:
            stale = False  # no source beside it: nothing to be stale against
        out[module] = "stale" if stale else "compiled"
    return out


def summary() -> str:
    """One line for ``--version`` and the startup log: "compiled (N modules)", "pure Python", or
    what is stale."""
    st = status()
    stale = [m for m, s in st.items() if s == "stale"]
    if stale:
        return "stale compiled modules (rebuild with scripts/bootstrap.sh): " + ", ".join(stale)
    compiled = sum(1 for s in st.values() if s == "compiled")
    if compiled == len(st):
        return f"compiled ({compiled} modules)"
    if compiled == 0:
        return "pure Python"
    return f"partly compiled ({compiled} of {len(st)} modules)"
