"""Issue #3 acceptance: hostile capabilities are refused with 401 capability-invalid, over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from revive.app import KEYRING
from revive.lab.settings import LAB_CONNECTION
from revive.testing.story import RUN, Story


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "revive", "aud": "revive", "typ": "run", "sub": RUN, "cnx": LAB_CONNECTION,
        "gen": 1, "epc": 1, "chk": "chk-1", "iat": now, "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(story: Story, claims: dict[str, Any], **header: Any) -> str:
    kid, key = story.sidecar.app[KEYRING].signing_key()
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid, **header})


def forged(story: Story) -> str:
    head, payload, sig = _sign(story, _claims()).split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    return ".".join((head, payload, flipped))


def alg_none(story: Story) -> str:
    kid, _ = story.sidecar.app[KEYRING].signing_key()
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(_claims()).encode())}."


def hs256_with_public_key(story: Story) -> str:
    kid, key = story.sidecar.app[KEYRING].signing_key()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(_claims()).encode())
    sig = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def expired(story: Story) -> str:
    past = int(time.time()) - 3600
    return _sign(story, _claims(iat=past - 60, exp=past))


def wrong_audience(story: Story) -> str:
    return _sign(story, _claims(aud="someone-else"))


def unknown_kid(story: Story) -> str:
    stranger = Ed25519PrivateKey.generate()
    return jwt.encode(_claims(), stranger, algorithm="EdDSA", headers={"kid": "not-ours"})


def other_connection(story: Story) -> str:
    return _sign(story, _claims(cnx="conn_someone_else"))


HOSTILE: dict[str, Callable[[Story], str]] = {
    "forged-signature": forged,
    "alg-none": alg_none,
    "hs256-public-key": hs256_with_public_key,
    "expired": expired,
    "wrong-audience": wrong_audience,
    "unknown-kid": unknown_kid,
    "other-connection": other_connection,
    "garbage": lambda story: "not.a.jwt",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_hostile_run_capability_is_refused(story: Story, kind: str) -> None:
    await story.mint(checkpoint="chk-1")  # the run exists; only the token is wrong
    token = HOSTILE[kind](story)
    answer = await story.graph("GET", "v1.0/me", token)
    assert answer.status == 401, answer.text
    assert answer.body["type"] == "urn:revive:capability-invalid"
    assert token not in answer.text
    sent = await story.send_briefing(token)
    assert sent.status == 401
    graph_calls = [c for c in await story.provider.calls() if c["path"].startswith("/v1.0")]
    assert graph_calls == []  # nothing reached the provider


async def test_missing_capability_is_refused(story: Story) -> None:
    answer = await story.call("GET", f"/proxy/{LAB_CONNECTION}/v1.0/me")
    assert answer.status == 401 and answer.body["type"] == "urn:revive:capability-invalid"


async def test_a_burned_recovery_capability_is_refused(story: Story) -> None:
    token = await story.mint(checkpoint="chk-calendar")
    await story.provider.fault("kill_grant")
    problem = (await story.send_briefing(token)).body
    assert (await story.reconnect()).status == 200
    issued = await story.call(
        "POST", f"/v1/cases/{problem['case_id']}/capability", admin=True, json={}
    )
    body = {"capability": issued.body["capability"]}
    first = await story.call("POST", "/v1/capabilities/redeem", json=body)
    again = await story.call("POST", "/v1/capabilities/redeem", json=body)
    assert first.status == 200
    assert again.status == 401 and again.body["type"] == "urn:revive:capability-invalid"


async def test_a_run_capability_cannot_be_redeemed_nor_a_recovery_one_proxied(
    story: Story,
) -> None:
    run_token = await story.mint()
    refused = await story.call("POST", "/v1/capabilities/redeem", json={"capability": run_token})
    assert refused.status == 401
