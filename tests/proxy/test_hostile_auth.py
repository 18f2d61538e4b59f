"""Hostile credentials against a real sidecar, black box (issue #9, part 4).

Forged and misused run capabilities on the proxy route, and admin routes called without
the admin token, each against the rig of ``revive.testing.hostile_rig``: refused with
401 ``capability-invalid`` / ``unauthorized`` (409 ``fenced`` where DESIGN §4 says so),
nothing forwarded, nothing changed; after every test the ``rig`` fixture checks that no
provider or admin token reached a client or the log, and no capability reached the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from revive.app import KEYRING, STORE
from revive.lab.settings import LAB_CONNECTION
from revive.testing.hostile_rig import HOSTILE, Rig, assert_problem, assert_refused, raw_get
from revive.tokens import CapabilityIssuer

RUN = "run_test"  # what RunningSidecar.capability mints for
CAPABILITY_INVALID = "urn:revive:capability-invalid"
FENCED = "urn:revive:fenced"
UNAUTHORIZED = "urn:revive:unauthorized"


# -- capabilities ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _hs256(key: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(key, message, hashlib.sha256).digest()


def _claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "revive", "aud": "revive", "typ": "run", "sub": RUN, "cnx": HOSTILE, "gen": 1,
        "epc": 1, "chk": "chk-1", "iat": now, "exp": now + 600, "jti": f"jti-{now}",
    }
    return {**claims, **override}


async def _forgeries(rig: Rig) -> dict[str, str]:
    """Tokens an attacker can build from what the sidecar publishes (``GET /v1/jwks``)."""
    jwks_reply = await rig.call("GET", "/v1/jwks", token="")
    jwks = jwks_reply.json()
    jwk = jwks["keys"][0]
    kid, x = jwk["kid"], jwk["x"]
    raw_public = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    pem = Ed25519PublicKey.from_public_bytes(raw_public).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    mine = Ed25519PrivateKey.generate()
    ours = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    claims = _claims()
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'kid': kid}).encode())}."
    return {
        "alg-none": unsigned + _b64(json.dumps(claims).encode()) + ".",
        "alg-None": _jwt({"alg": "None", "kid": kid}, claims, lambda m: b""),
        "hs256-raw-public-key": _jwt({"alg": "HS256", "kid": kid}, claims, _hs256(raw_public)),
        "hs256-jwk-x": _jwt({"alg": "HS256", "kid": kid}, claims, _hs256(x.encode())),
        "hs256-pem": _jwt({"alg": "HS256", "kid": kid}, claims, _hs256(pem)),
        "hs256-jwks-document": _jwt(
            {"alg": "HS256", "kid": kid}, claims, _hs256(jwks_reply.body)
        ),
        "eddsa-attacker-key-real-kid": _jwt(ours, claims, mine.sign),
        "eddsa-attacker-key-embedded-jwk": _jwt(
            {**ours, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": _b64(
                mine.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}},
            claims, mine.sign,
        ),
        "unknown-kid": _jwt({**ours, "kid": "attacker-key-1"}, claims, mine.sign),
        "kid-path-traversal": _jwt({**ours, "kid": "../../../../dev/null"}, claims, mine.sign),
        "no-kid": _jwt({"alg": "EdDSA"}, claims, mine.sign),
        "truncated": _jwt(ours, claims, mine.sign)[:-10],
        "garbage": "not.a.jwt",
        "oversized": "eyJ" + "A" * 8_000,  # near aiohttp's 8190-byte line limit
    }


async def test_forged_capabilities_are_refused(rig: Rig) -> None:
    for name, token in (await _forgeries(rig)).items():
        reply = await rig.call("GET", f"/proxy/{HOSTILE}/items", token=token)
        assert_problem(reply, CAPABILITY_INVALID)
        assert token.encode() not in reply.body, name
    assert rig.upstream.seen == []


def _sign_with_sidecar_key(rig: Rig, claims: dict[str, Any]) -> str:
    """A token bearing the sidecar's real signature: only the claims can be wrong."""
    kid, key = rig.sidecar.app[KEYRING].signing_key()
    return _jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims, key.sign)


async def test_well_signed_capabilities_with_wrong_claims_are_refused(rig: Rig) -> None:
    now = int(time.time())
    keyring = rig.sidecar.app[KEYRING]
    expired, _ = CapabilityIssuer(keyring, clock=lambda: now - 3600).mint_run(
        RUN, HOSTILE, 1, 1, "chk-1", ttl=60
    )
    other_connection = await rig.sidecar.capability(LAB_CONNECTION)
    recovery, _ = CapabilityIssuer(keyring).mint_recovery(RUN, HOSTILE, 1, 2, "chk-1", "case-x")
    refused = {
        "expired": expired,
        "another-connection": other_connection,
        "recovery-used-as-run": recovery,
        "wrong-audience": _sign_with_sidecar_key(rig, _claims(aud="graph")),
        "wrong-issuer": _sign_with_sidecar_key(rig, _claims(iss="evil")),
        "over-long-life": _sign_with_sidecar_key(rig, _claims(exp=now + 86_400)),
        "issued-in-the-future": _sign_with_sidecar_key(rig, _claims(iat=now + 600, exp=now + 900)),
        "missing-claim": _sign_with_sidecar_key(
            rig, {k: v for k, v in _claims().items() if k != "epc"}
        ),
        "string-generation": _sign_with_sidecar_key(rig, _claims(gen="1")),
    }
    rig.capabilities += list(refused.values())
    for name, token in refused.items():
        reply = await rig.call("GET", f"/proxy/{HOSTILE}/items", token=token)
        assert_problem(reply, CAPABILITY_INVALID)
        assert name and token.encode() not in reply.body
    # A run capability is not a recovery capability: redemption refuses it.
    redeem = await rig.call(
        "POST", "/v1/capabilities/redeem", token="", json={"capability": rig.capability}
    )
    assert_problem(redeem, CAPABILITY_INVALID)
    assert rig.upstream.seen == []


async def test_capabilities_for_another_run_or_epoch_are_fenced(rig: Rig) -> None:
    fenced = {
        "unknown-run": _sign_with_sidecar_key(rig, _claims(sub="run_never_minted")),
        "future-epoch": _sign_with_sidecar_key(rig, _claims(epc=2)),
        "future-generation": _sign_with_sidecar_key(rig, _claims(gen=2)),
    }
    rig.capabilities += list(fenced.values())
    for token in fenced.values():
        reply = await rig.call("GET", f"/proxy/{HOSTILE}/items", token=token)
        assert_problem(reply, FENCED)
        posted = await rig.call(
            "POST", f"/proxy/{HOSTILE}/items", token=token, json={"n": 1},
            headers={"Revive-Action": "create-item"},
        )
        assert_problem(posted, FENCED)
        renewed = await rig.call(
            "POST", "/v1/capabilities/renew", token="", json={"capability": token}
        )
        assert_problem(renewed, FENCED)
    assert rig.upstream.seen == []


# -- admin routes ------------------------------------------------------------------------------


async def _open_case(rig: Rig) -> str:
    """A real recovery case: the provider kills the grant under a proxied request."""
    capability = await rig.sidecar.capability(LAB_CONNECTION)
    rig.capabilities.append(capability)
    await rig.provider.fault("kill_grant")
    reply = await rig.call("GET", f"/proxy/{LAB_CONNECTION}/v1.0/me", token=capability)
    problem = assert_problem(reply, "urn:revive:recovery-required")
    case_id: str = problem["case_id"]
    return case_id


async def _generation(rig: Rig, connection_id: str) -> int:
    row = await rig.sidecar.app[STORE].get_connection(connection_id)
    assert row is not None
    return row.generation


async def test_admin_routes_refuse_missing_wrong_or_capability_tokens(rig: Rig) -> None:
    case_id = await _open_case(rig)
    admin = {"Authorization": f"Bearer {rig.admin_token}"}
    before = await rig.call("GET", f"/v1/cases/{case_id}", token="", headers=admin)
    assert before.status == 200
    generation = await _generation(rig, HOSTILE)

    credentials: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Bearer {rig.capability}"},
        {"Authorization": f"Basic {rig.admin_token}"},
        {"Authorization": f"Bearer {rig.admin_token}x"},
        {"Authorization": f"Bearer {rig.admin_token[:-1]}"},
        {"Authorization": f"Bearer {rig.admin_token.swapcase()}"},
        {"X-Admin-Token": rig.admin_token},
        {"Cookie": f"token={rig.admin_token}"},
    ]
    routes = [
        ("GET", "/v1/cases", None),
        ("GET", f"/v1/cases/{case_id}", None),
        ("POST", f"/v1/cases/{case_id}/capability", {"actor": "mallory"}),
        ("POST", f"/v1/cases/{case_id}/abandon", {"actor": "mallory", "reason": "x"}),
        ("POST", f"/v1/connections/{HOSTILE}/reconnected", {"actor": "mallory"}),
        ("POST", f"/v1/connections/{LAB_CONNECTION}/reconnected", {"actor": "mallory"}),
    ]
    for method, path, body in routes:
        for headers in credentials:
            reply = await rig.call(method, path, token="", headers=headers, json=body)
            assert_problem(reply, UNAUTHORIZED)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert case_id not in reply.body.decode().replace(path, "")  # nothing disclosed

    after = await rig.call("GET", f"/v1/cases/{case_id}", token="", headers=admin)
    assert after.json() == before.json()  # same state, not one more transition
    assert await _generation(rig, HOSTILE) == generation
    await rig.healthy()  # not fenced: no reconnect was recorded

    # The real admin token does move the connection on: the old capability is now fenced.
    moved = await rig.call(
        "POST", f"/v1/connections/{HOSTILE}/reconnected", token="", headers=admin, json={}
    )
    assert moved.status == 200, moved.body
    stale = await rig.call("GET", f"/proxy/{HOSTILE}/items")
    assert_problem(stale, FENCED)


async def test_a_malformed_authorization_line_never_reaches_the_log(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    for value in (f"Bearer {rig.capability}\x00", f"Bearer {rig.admin_token}\x01"):
        answer = await rig.raw(raw_get(f"/proxy/{HOSTILE}/a", ("Authorization", value), close=False))
        assert_refused(answer)
        # aiohttp echoes the offending line to the sender, who wrote it; keep it out of the
        # suite's transcript, which asserts nothing secret reaches *any* client.
        rig.received.pop()
    assert caplog.text.count("malformed request (BadHttpMessage)") == 2
    assert rig.capability not in caplog.text and rig.admin_token not in caplog.text
    assert rig.upstream.seen == []
