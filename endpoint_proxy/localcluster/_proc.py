"""Process and port helpers shared by the local PostgreSQL and MariaDB clusters."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"


def _proc_state(pid: int) -> str | None:
    """The process state letter from /proc/PID/stat, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    return rest[0] if rest else None


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _free_ports(count: int) -> list[int]:
    """Ports the OS considers free on the loopback address (all held open until all are chosen,
    so they are distinct)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        # Timed out or otherwise unreachable: something is still bound there.
        return True


def _wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    describe: Callable[[], str],
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(describe())
        time.sleep(interval)
