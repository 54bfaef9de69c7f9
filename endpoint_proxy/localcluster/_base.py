"""What the local PostgreSQL and MariaDB clusters share: instance lookup, logs, teardown of the directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType
from typing import Generic, Protocol, TypeVar


class _Instance(Protocol):
    name: str
    log_file: Path

    def pid(self) -> int | None: ...


InstanceT = TypeVar("InstanceT", bound=_Instance)


class LocalClusterBase(Generic[InstanceT]):
    instances: list[InstanceT]
    primary_name: str
    root_dir: Path | None
    _created_root: bool

    def stop(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def instance(self, name: str) -> InstanceT:
        for inst in self.instances:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.instances) or "none (cluster not started)"
        raise KeyError(f"no instance named {name!r}; instances: {known}")

    @property
    def primary(self) -> InstanceT:
        return self.instance(self.primary_name)

    def _running_pid(self, name: str) -> int:
        pid = self.instance(name).pid()
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        return pid

    @staticmethod
    def _log_size(inst: InstanceT) -> int:
        try:
            return inst.log_file.stat().st_size
        except OSError:
            return 0

    @staticmethod
    def _log_text(inst: InstanceT) -> str:
        try:
            return inst.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, inst: InstanceT, lines: int = 20) -> str:
        tail = self._log_text(inst).splitlines()[-lines:]
        return f"--- last lines of {inst.log_file} ---\n" + "\n".join(tail)

    def _remove_root(self) -> None:
        """Delete the cluster directory (or, when the caller gave it, only empty it)."""
        root, self.root_dir = self.root_dir, None
        if root is None or not root.exists():
            return
        if self._created_root:
            shutil.rmtree(root, ignore_errors=True)
            return
        for entry in root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
