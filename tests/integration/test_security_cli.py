"""The security switches of ``dspex-bridge`` as a user runs them: real subprocesses, real TLS."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dspex_dspy.tokens import verify_token
from tests.conftest import BridgeProcess
from tests.support.tls_material import TlsMaterial, make_material

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # generous bound on a subprocess; never an assertion on speed


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    for name in ("DSPEX_BRIDGE_CA", "DSPEX_BRIDGE_TOKEN", "DSPEX_BRIDGE_CERT", "DSPEX_BRIDGE_KEY"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "dspex_dspy.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "bridge.secret"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def test_serving_all_interfaces_without_tls_and_tokens_is_refused() -> None:
    done = _cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert done.returncode != 0
    assert "without TLS and tokens" in done.stderr
    assert "--insecure" in done.stderr
    assert "listening" not in done.stdout


def test_tls_alone_is_not_enough_beyond_loopback(material: TlsMaterial) -> None:
    done = _cli(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--tls-cert",
        str(material.server.cert_path),
        "--tls-key",
        str(material.server.key_path),
    )
    assert done.returncode != 0
    assert "without tokens" in done.stderr


def test_insecure_serves_all_interfaces_and_warns(spawn_bridge: Callable[..., BridgeProcess]) -> None:
    bridge = spawn_bridge("--host", "0.0.0.0", "--insecure", "--log-level", "WARNING")
    try:
        assert any("INSECURE" in line for line in bridge.output)
    finally:
        bridge.stop()


def test_a_token_from_the_cli_opens_a_tls_bridge_to_ping(
    spawn_bridge: Callable[..., BridgeProcess], material: TlsMaterial, secret_file: Path
) -> None:
    minted = _cli(
        "token",
        "--secret-file",
        str(secret_file),
        "--sub",
        "ci",
        "--session",
        "s1",
        "--perms",
        "read,watch",
        "--ttl",
        "600",
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    claims = verify_token(secret_file.read_text().strip(), token)
    assert (claims.sub, claims.sessions, claims.perms) == ("ci", frozenset({"s1"}), frozenset({"read", "watch"}))

    bridge = spawn_bridge(
        "--host",
        "0.0.0.0",
        "--tls-cert",
        str(material.server.cert_path),
        "--tls-key",
        str(material.server.key_path),
        "--auth-secret-file",
        str(secret_file),
        "--log-level",
        "WARNING",
    )
    try:
        assert not any("INSECURE" in line for line in bridge.output)
        assert bridge.address is not None
        address = "127.0.0.1:" + bridge.address.rpartition(":")[2]
        pinged = _cli("ping", address, "--ca", str(material.ca.path), "--token", token)
        assert pinged.returncode == 0, pinged.stderr
        assert pinged.stdout.startswith("pong: ping")
        refused = _cli("ping", address, "--ca", str(material.ca.path), "--timeout", "3")
        assert refused.returncode != 0
        assert "bearer token" in refused.stderr
    finally:
        bridge.stop()


def test_bad_security_options_are_reported(material: TlsMaterial, tmp_path: Path) -> None:
    short = tmp_path / "short.secret"
    short.write_text("too-short")
    done = _cli("serve", "--port", "0", "--auth-secret-file", str(short))
    assert done.returncode != 0 and "at least 32 bytes" in done.stderr
    done = _cli("serve", "--port", "0", "--tls-cert", str(material.server.cert_path))
    assert done.returncode != 0 and "--tls-key" in done.stderr
    done = _cli("token", "--secret-file", str(short), "--sub", "x", "--session", "s", "--perms", "read")
    assert done.returncode != 0 and "at least 32 bytes" in done.stderr
