"""Build hook: the per-transaction modules listed in ``endpoint_proxy/compiled.py`` are
compiled with mypyc (one C extension each, plus one shared runtime library).

``ENDPOINT_PROXY_PURE=1`` at install time skips compiling: the Python sources then run as they
are, with the same behaviour and more CPU per transaction.
"""

from __future__ import annotations

import os
import runpy

from setuptools import setup

# The build environment has the runtime dependencies at their pins ([build-system] requires), so
# mypyc knows trio's types as `mypy` does; it checks with mypy's defaults, not the project's
# strict settings (those are for `mypy`), and scramp, which ships no types, is Any.
BUILD_OPTIONS = ["--config-file", os.devnull, "--ignore-missing-imports"]

ext_modules = []
if os.environ.get("ENDPOINT_PROXY_PURE", "") in ("", "0"):
    from mypyc.build import mypycify

    listed = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "endpoint_proxy", "compiled.py"))
    ext_modules = mypycify([listed["source_path"](m) for m in listed["COMPILED"]] + BUILD_OPTIONS, opt_level="3")

setup(ext_modules=ext_modules)
