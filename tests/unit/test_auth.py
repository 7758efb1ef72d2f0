"""Tokens, the rate limiter and the exposure rule, without a server."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from dspex_dspy.auth import RateLimiter, check_exposure
from dspex_dspy.errors import AuthenticationError, PermissionDeniedError, ValidationError
from dspex_dspy.tls import ChannelSecurity, is_loopback, read_pem, resolve_security
from dspex_dspy.tokens import load_secret, mint_token, verify_token

pytestmark = pytest.mark.unit

SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"[:48]


def test_a_minted_token_verifies_with_its_claims() -> None:
    token = mint_token(SECRET, sub="w1", sessions=["a", "b"], perms=("read", "watch"), ttl=60)
    claims = verify_token(SECRET, token)
    assert (claims.sub, claims.sessions, claims.perms) == ("w1", frozenset({"a", "b"}), frozenset({"read", "watch"}))
    assert claims.allows("read", "a") and not claims.allows("write", "a") and not claims.allows("read", "c")
    assert time.time() < claims.exp <= time.time() + 60


def test_a_token_is_valid_until_the_exact_time_its_exp_names() -> None:
    # exp 1000.9: PyJWT alone would take it for 1000 and refuse the token from then on.
    token = mint_token(SECRET, sub="w1", sessions=["a"], perms="read", ttl=0.9, now=1000.0)
    assert verify_token(SECRET, token, now=1000.5).exp == 1000.9
    with pytest.raises(AuthenticationError, match="expired"):
        verify_token(SECRET, token, now=1000.9)


def test_star_opens_every_session() -> None:
    claims = verify_token(SECRET, mint_token(SECRET, sub="ops", sessions="*", perms="admin", ttl=60))
    assert claims.sessions is None and claims.names_session("anything")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: "garbage", "malformed"),
        (lambda: mint_token(b"x" * 32, sub="a", sessions=["s"], perms="read", ttl=60), "signature"),
        (lambda: mint_token(SECRET, sub="a", sessions=["s"], perms="read", ttl=1, now=time.time() - 10), "expired"),
        (lambda: jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET, algorithm="HS256"), "'sessions'"),
        (
            lambda: jwt.encode({"sub": "a", "sessions": "s", "perms": ["read"], "exp": time.time() + 60}, SECRET),
            "sessions",
        ),
        (
            lambda: jwt.encode(
                {"sub": "a", "sessions": ["s"], "perms": ["read"], "exp": time.time() + 60}, SECRET, algorithm="HS384"
            ),
            "malformed",
        ),
        (
            lambda: jwt.encode({"sub": "a", "sessions": ["s"], "perms": ["read"], "exp": "soon"}, SECRET),
            "exp claim",
        ),
    ],
    ids=["garbage", "other-secret", "expired", "missing-claim", "bad-sessions", "other-algorithm", "bad-exp"],
)
def test_a_bad_token_is_an_authentication_error_that_hides_it(token: object, message: str) -> None:
    text = token()  # type: ignore[operator]
    with pytest.raises(AuthenticationError, match=message) as info:
        verify_token(SECRET, text)
    assert text not in str(info.value) and SECRET.decode() not in str(info.value)
    assert isinstance(info.value, PermissionError)


def test_minting_refuses_bad_input() -> None:
    with pytest.raises(ValidationError, match="unknown permission"):
        mint_token(SECRET, sub="a", sessions=["s"], perms="read,fly", ttl=60)
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        mint_token(b"short", sub="a", sessions=["s"], perms="read", ttl=60)
    with pytest.raises(ValidationError, match="ttl"):
        mint_token(SECRET, sub="a", sessions=["s"], perms="read", ttl=0)
    with pytest.raises(ValidationError, match="sub"):
        mint_token(SECRET, sub="", sessions=["s"], perms="read", ttl=60)
    with pytest.raises(ValidationError, match="session ids"):
        mint_token(SECRET, sub="a", sessions=[], perms="read", ttl=60)


def test_a_secret_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert load_secret(path) == SECRET
    with pytest.raises(ValidationError, match="cannot read"):
        load_secret(tmp_path / "missing")


def test_the_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=2)
    assert [limiter.acquire("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.acquire("b", now=10.0) == 0.0  # buckets are per principal
    assert limiter.acquire("a", now=10.5) == 0.0
    assert limiter.acquire("a", now=10.5) > 0.0


def test_the_bucket_forgets_idle_principals() -> None:
    limiter = RateLimiter(rate=100.0, burst=1, max_principals=10)
    for n in range(50):
        limiter.acquire(f"p{n}", now=float(n))
    assert len(limiter._buckets) <= 11


def test_binding_beyond_loopback_needs_both_tls_and_tokens(caplog: pytest.LogCaptureFixture) -> None:
    check_exposure("127.0.0.1", tls=False, auth=False, insecure=False)
    check_exposure("::1", tls=False, auth=False, insecure=False)
    check_exposure("0.0.0.0", tls=True, auth=True, insecure=False)
    with pytest.raises(PermissionDeniedError, match="without TLS and tokens"):
        check_exposure("0.0.0.0", tls=False, auth=False, insecure=False)
    with pytest.raises(PermissionDeniedError, match="without TLS"):
        check_exposure("10.0.0.5", tls=False, auth=True, insecure=False)
    check_exposure("0.0.0.0", tls=False, auth=False, insecure=True)
    assert "INSECURE" in caplog.text


def test_loopback_names() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com") and not is_loopback("::")


def test_channel_security_reads_the_environment_and_hides_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.pem").write_bytes(pem)
    monkeypatch.setenv("DSPEX_BRIDGE_CA", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("DSPEX_BRIDGE_TOKEN", "tok-123")
    security = resolve_security()
    assert security == ChannelSecurity(root_certificates=pem, token="tok-123")
    assert "tok-123" not in repr(security)
    assert resolve_security(token="given").token == "given"
    with pytest.raises(ValidationError, match="private key"):
        resolve_security(certificate_chain=pem)
    with pytest.raises(ValidationError, match="not PEM"):
        read_pem(b"hello", "tls CA")
