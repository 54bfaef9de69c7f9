"""No secret in the output: a proxy with known passwords goes through good and bad logins, the
console, reloads (good and failing), /topology and /metrics; then everything it printed and
served is searched for every password, token, verifier key and wrong guess."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tomli_w

from endpoint_proxy.localcluster.postgresql import PostgresCluster
from tests.fixtures.proxy import ProxyProcess, free_port, pg_proxy_config, wait_until

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "Adm1n-T0ken-zq81-never-logged"
ADMIN_PASSWORD = "Adm1n-Pass-ux47-never-logged"
VERIFIED_PASSWORD = "Ver1fied-Pass-kk29-never-logged"
ROTATED_PASSWORD = "R0tated-Pass-yy55-never-logged"
WRONG_GUESSES = ("Wr0ng-Guess-aa11-never-logged", "Wr0ng-Token-bb22-never-logged")


def http(proxy: ProxyProcess, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
         ) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{proxy.doc['admin']['listen']}{path}", method=method,
                                     data=b"" if method == "POST" else None, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def login(port: int, cluster: PostgresCluster, user: str, password: str, database: str | None = None) -> str:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                                     database=database or cluster.database, ssl=False, timeout=10)
    except (asyncpg.PostgresError, OSError) as e:
        return f"error: {e}"
    try:
        if database == "endpoint_proxy":
            await conn.execute("SHOW INSTANCES")
        else:
            await conn.fetchval("select 1")
    finally:
        await conn.close()
    return "ok"


def test_no_secret_in_logs_topology_or_metrics(pg_cluster: PostgresCluster, pg_proxy: ProxyProcess,
                                               tmp_path: Path) -> None:
    # (pg_proxy: its fixture creates the md5user role)
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, f"drop role if exists verified_user; "
                            f"create role verified_user login password '{VERIFIED_PASSWORD}'")
    pg_cluster.sql(primary, f"grant connect on database {pg_cluster.database} to verified_user")
    verifier = pg_cluster.sql(primary, "select rolpassword from pg_authid where rolname = 'verified_user'")
    app_password_file = tmp_path / "app-password"
    app_password_file.write_text(pg_cluster.app_password + "\n")
    doc = pg_proxy_config(pg_cluster)
    doc.pop("tls", None)
    doc["logging"] = {"format": "json", "level": "debug"}
    doc["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token_env": "EP_TEST_ADMIN_TOKEN",
                    "users": [{"name": "ops", "password": ADMIN_PASSWORD}]}
    c = doc["clusters"][0]
    c["endpoints"] = [e for e in c["endpoints"] if e["name"] in ("writer", "reader")]
    c["monitor"] = {"user": pg_cluster.monitor_user, "password_env": "EP_TEST_MONITOR_PASSWORD"}
    c["users"] = [{"name": pg_cluster.app_user, "password_file": str(app_password_file)},
                  {"name": "md5user", "password": "md5-secret", "auth": "md5"},
                  {"name": "verified_user", "password": verifier}]
    secrets = [pg_cluster.app_password, "md5-secret", pg_cluster.monitor_password, ADMIN_TOKEN, ADMIN_PASSWORD,
               VERIFIED_PASSWORD, ROTATED_PASSWORD, *WRONG_GUESSES,
               *verifier.split("$")[2].split(":")]  # StoredKey and ServerKey of the verifier
    os.environ["EP_TEST_ADMIN_TOKEN"] = ADMIN_TOKEN
    os.environ["EP_TEST_MONITOR_PASSWORD"] = pg_cluster.monitor_password
    served: list[bytes] = []
    try:
        with ProxyProcess(doc, tmp_path) as proxy:
            port = proxy.port("writer")
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            wait_until(lambda: http(proxy, "/readyz")[0] == 200, 20, "the proxy to be ready")

            async def logins() -> list[str]:
                return [
                    await login(port, pg_cluster, pg_cluster.app_user, pg_cluster.app_password),
                    await login(port, pg_cluster, "md5user", "md5-secret"),
                    await login(port, pg_cluster, "verified_user", VERIFIED_PASSWORD),
                    await login(port, pg_cluster, pg_cluster.app_user, WRONG_GUESSES[0]),
                    await login(port, pg_cluster, "md5user", WRONG_GUESSES[0]),
                    await login(port, pg_cluster, "nobody", WRONG_GUESSES[0]),
                    await login(port, pg_cluster, "ops", ADMIN_PASSWORD, "endpoint_proxy"),
                    await login(port, pg_cluster, "ops", WRONG_GUESSES[0], "endpoint_proxy"),
                ]

            outcomes = asyncio.run(logins())
            assert outcomes[:2] == ["ok", "ok"] and outcomes[6] == "ok"
            assert all(o.startswith("error") for o in outcomes[3:6] + outcomes[7:])
            basic = base64.b64encode(f"ops:{WRONG_GUESSES[1]}".encode()).decode()
            assert http(proxy, "/topology", headers={"Authorization": f"Bearer {WRONG_GUESSES[1]}"})[0] == 401
            assert http(proxy, "/topology", headers={"Authorization": f"Basic {basic}"})[0] == 401
            good_basic = base64.b64encode(f"ops:{ADMIN_PASSWORD}".encode()).decode()
            assert http(proxy, "/topology", headers={"Authorization": f"Basic {good_basic}"})[0] == 200
            # A reload that rotates the app password (in its file), and reloads that fail.
            app_password_file.write_text(ROTATED_PASSWORD + "\n")
            assert http(proxy, "/reload", method="POST", headers=auth) == (200, b'{\n "ok": true\n}\n')
            broken: dict[str, Any] = copy.deepcopy(doc)
            broken["clusters"][0]["users"][2]["password"] = verifier[:-4] + "!!!!"
            proxy.config_path.write_bytes(tomli_w.dumps(broken).encode())
            status, body = http(proxy, "/reload", method="POST", headers=auth)
            assert status == 400 and b"users[2].password" in body
            served.append(body)
            broken["clusters"][0]["users"][2]["password"] = verifier
            broken["clusters"][0]["users"].append({"name": "x", "password_env": "EP_TEST_UNSET"})
            proxy.config_path.write_bytes(tomli_w.dumps(broken).encode())
            status, body = http(proxy, "/reload", method="POST", headers=auth)
            assert status == 400 and b"EP_TEST_UNSET" in body
            served.append(body)
            for path in ("/topology", "/metrics", "/"):
                status, body = http(proxy, path, headers=auth)
                assert status == 200
                served.append(body)
            console = asyncio.run(login(port, pg_cluster, "ops", ADMIN_PASSWORD, "endpoint_proxy"))
            assert console == "ok"
            topology = json.loads(served[2])
            assert topology["clusters"][0]["writer"] == primary
        # `check` on a config that names a missing variable: the error names the key, no secret.
        check = subprocess.run([sys.executable, "-m", "endpoint_proxy", "check", "--config", str(proxy.config_path)],
                               capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
                               env={k: v for k, v in os.environ.items() if k != "EP_TEST_MONITOR_PASSWORD"})
        assert check.returncode == 2 and "EP_TEST_UNSET" in check.stderr
        served.append((check.stdout + check.stderr).encode())
    finally:
        os.environ.pop("EP_TEST_ADMIN_TOKEN", None)
        os.environ.pop("EP_TEST_MONITOR_PASSWORD", None)
        pg_cluster.sql(primary, f"revoke connect on database {pg_cluster.database} from verified_user; "
                                "drop role if exists verified_user")
    output = proxy.log().encode() + b"\n".join(served)
    assert b'"client_auth_failed"' in output and b'"config_reloaded"' in output  # the run did log things
    assert b'"config_reload_failed"' in output
    leaked = [s for s in secrets if s.encode() in output]
    assert not leaked, f"secrets in the proxy's output: {leaked}"
