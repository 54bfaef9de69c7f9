"""`endpoint-proxy demo`: a real cluster behind the proxy, with psql commands that work as printed."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.proxy import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_demo_prints_working_psql_commands_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "endpoint_proxy", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        wait_until(lambda: any("Status page" in ln for ln in lines), 60, "the demo to be ready")
        commands = {m.group(1): m.group(2) for ln in lines
                    if (m := re.match(r"\s+(writer|reader|readwrite)\s+(.*psql.*)$", ln))}
        assert set(commands) == {"writer", "reader", "readwrite"}
        roles = {}
        for name, command in commands.items():
            words = shlex.split(command)
            env = dict(os.environ)
            while "=" in words[0]:
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            out = subprocess.run([*words, "-At"], env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            roles[name] = out.stdout.strip().split("|")[1]
        assert roles == {"writer": "f", "reader": "t", "readwrite": "t"}
        url = re.search(r"(http://\S+/)", "".join(lines))
        assert url is not None
        # The admin server needs the credentials the demo prints (user admin, password admin-secret).
        auth = {"Authorization": "Basic " + base64.b64encode(b"admin:admin-secret").decode()}
        topology = urllib.request.Request(url.group(1) + "topology", headers=auth)
        with urllib.request.urlopen(topology, timeout=10) as response:
            assert json.load(response)["clusters"][0]["writer"] == "pg0"
        # The demo promotes with SQL: the printed SWITCHOVER command works as printed.
        switchover = next(m.group(1) for ln in lines if (m := re.match(r"\s+switchover\s+(.*psql.*)$", ln)))
        words = shlex.split(switchover)
        env = dict(os.environ)
        while "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        out = subprocess.run([*words, "-At"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith("demo|pg0|") and "|completed|" in out.stdout
        with urllib.request.urlopen(topology, timeout=10) as response:
            assert json.load(response)["clusters"][0]["writer"] != "pg0"
        tmp_dirs = re.findall(r"Cluster files: (\S+)", "".join(lines))
        assert tmp_dirs and Path(tmp_dirs[0]).is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        t.join(5)
    assert code == 0, "".join(lines)
    assert "stopping the cluster" in "".join(lines)
    for d in tmp_dirs:
        assert not Path(d).exists()


def _psql(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    words = shlex.split(command)
    env = dict(os.environ)
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return subprocess.run([*words, "-At"], env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_patroni_follows_the_leader_key_and_switches_over_through_patroni() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "endpoint_proxy", "demo", "--patroni"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    tmp_dirs: list[str] = []
    try:
        wait_until(lambda: any("Status page" in ln for ln in lines), 120, "the Patroni demo to be ready")
        tmp_dirs = re.findall(r"Cluster files: (\S+)", "".join(lines))
        commands = {m.group(1): m.group(2) for ln in lines
                    if (m := re.match(r"\s+(writer|switchover)\s+(.*psql.*)$", ln))}
        out = _psql(commands["writer"])
        assert out.returncode == 0 and out.stdout.strip().endswith("|f"), out.stderr
        out = _psql(commands["switchover"])
        assert out.returncode == 0 and "|completed|" in out.stdout, out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        t.join(5)
    assert code == 0, "".join(lines)
    assert tmp_dirs and not Path(tmp_dirs[0]).exists()
