"""The state file (``[server] state_file``): fencing's high-water marks, read at start, written when they rise.

A missing file is an empty memory; an unreadable or corrupt one is a log line and an empty
memory, never a crash (the proxy then fences from what it sees, as without a file). Writes
go to a temporary file in the same directory, are flushed to disk and renamed over the
file, so a crash leaves the old contents or the new, never half of either. Each write merges
with what is on disk (marks only rise), so worker processes sharing the file keep the
highest mark any of them saw.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import structlog

from ..topology.memory import decode_memory, encode_memory, merge_memory
from ..topology.state import HighWater

log = structlog.get_logger("endpoint_proxy.state")


class StateFile:
    """One state file; ``path`` None keeps everything in memory (nothing survives a restart)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._marks: dict[str, HighWater] = {}
        self._lock = threading.Lock()  # writes may come from several threads

    def load(self) -> dict[str, HighWater]:
        """Read the file (blocking; call at start). Returns the marks, empty when there are none."""
        if self.path is None:
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("state_file_missing", path=str(self.path), detail="starting with no remembered timelines")
            return {}
        except (OSError, UnicodeDecodeError) as e:
            log.error("state_file_unreadable", path=str(self.path), error=f"{type(e).__name__}: {e}",
                      detail="ignored: starting with no remembered timelines")
            return {}
        try:
            marks = decode_memory(text)
        except ValueError as e:
            log.error("state_file_corrupt", path=str(self.path), error=str(e),
                      detail="ignored: starting with no remembered timelines; it is rewritten at the next change")
            return {}
        with self._lock:
            self._marks = merge_memory(self._marks, marks)
        log.info("state_file_loaded", path=str(self.path),
                 clusters={name: f"timeline {m.timeline} on {m.instance}" for name, m in marks.items()})
        return dict(marks)

    def recorded(self, cluster: str) -> HighWater | None:
        with self._lock:
            return self._marks.get(cluster)

    def record(self, cluster: str, mark: HighWater) -> None:
        """Remember a cluster's mark and write the file (blocking: run it in a thread). Errors
        are logged, never raised: the proxy keeps the mark in memory and goes on."""
        with self._lock:
            self._marks = merge_memory(self._marks, {cluster: mark})
            if self.path is None:
                return
            try:
                self._write_merged()
            except OSError as e:
                log.error("state_file_write_failed", path=str(self.path), cluster=cluster,
                          error=f"{type(e).__name__}: {e}")
                return
        log.info("state_file_written", path=str(self.path), cluster=cluster,
                 timeline=mark.timeline, instance=mark.instance)

    def _write_merged(self) -> None:
        assert self.path is not None
        try:
            on_disk = decode_memory(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            on_disk = {}  # missing or corrupt: what this process knows replaces it
        self._marks = merge_memory(on_disk, self._marks)
        text = encode_memory(self._marks)
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename itself is durable only once the directory is.
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
