"""Capabilities: keyring on disk, minting, every refusal, and the verified-claims cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from revive.errors import CapabilityInvalid, ConfigError
from revive.tokens import (
    RECOVERY_TTL_MAX,
    RUN_TTL_MAX,
    CapabilityClaims,
    CapabilityIssuer,
    CapabilityVerifier,
    Keyring,
    jwk_thumbprint,
)

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64json(obj: Any) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
async def keyring(tmp_path: Path) -> Keyring:
    return await Keyring.load_or_create(tmp_path / "keys")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(keyring: Keyring, clock: Clock) -> CapabilityIssuer:
    return CapabilityIssuer(keyring, clock=clock)


@pytest.fixture
def verifier(keyring: Keyring, clock: Clock) -> CapabilityVerifier:
    return CapabilityVerifier(keyring, clock=clock)


def _payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": "revive", "aud": "revive", "typ": "run", "sub": "run_1", "cnx": "conn_a",
        "gen": 1, "epc": 1, "chk": "ck_1", "iat": int(T0), "exp": int(T0) + 600, "jti": "j1",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def _sign(keyring: Keyring, payload: dict[str, Any], **headers: Any) -> str:
    kid, key = keyring.signing_key()
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid, **headers})


def _refused(verifier: CapabilityVerifier, token: str, **kw: Any) -> CapabilityInvalid:
    with pytest.raises(CapabilityInvalid) as info:
        verifier.verify(token, **kw)
    exc = info.value
    # The token never leaks: not in the message, the problem body, nor a chained exception.
    if token:
        assert token not in str(exc)
        assert token not in json.dumps(exc.to_problem())
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__
    assert exc.status == 401 and exc.type == "urn:revive:capability-invalid"
    return exc


# -- keyring ---------------------------------------------------------------------------------


async def test_keys_are_created_private_and_reused(tmp_path: Path, keyring: Keyring) -> None:
    keys_dir = tmp_path / "keys"
    files = list(keys_dir.glob("*.pem"))
    assert len(files) == 1 and keyring.signer_kid in files[0].name
    assert _mode(keys_dir) == 0o700 and _mode(files[0]) == 0o600

    again = await Keyring.load_or_create(keys_dir)
    assert again.kids == keyring.kids
    assert list(keys_dir.glob("*.pem")) == files


async def test_kid_is_rfc7638_thumbprint(keyring: Keyring) -> None:
    (jwk,) = keyring.jwks()["keys"]
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":")
    )
    assert jwk["kid"] == _b64(hashlib.sha256(canonical.encode()).digest())
    assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"], "kid": keyring.signer_kid,
                   "alg": "EdDSA", "use": "sig"}
    _, key = keyring.signing_key()
    assert jwk_thumbprint(key.public_key()) == keyring.signer_kid


async def test_private_material_not_in_repr_or_jwks(keyring: Keyring) -> None:
    _, key = keyring.signing_key()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    shown = repr(keyring) + json.dumps(keyring.jwks())
    assert _b64(raw) not in shown and raw.hex() not in shown and '"d"' not in shown


async def test_loose_modes_are_tightened(tmp_path: Path, keyring: Keyring) -> None:
    keys_dir = tmp_path / "keys"
    (pem,) = keys_dir.glob("*.pem")
    pem.chmod(0o644)
    keys_dir.chmod(0o755)
    await Keyring.load_or_create(keys_dir)
    assert _mode(keys_dir) == 0o700 and _mode(pem) == 0o600


async def test_other_files_in_keys_dir_are_ignored(tmp_path: Path, keyring: Keyring) -> None:
    (tmp_path / "keys" / "grants.key").write_bytes(b"not a pem")
    assert (await Keyring.load_or_create(tmp_path / "keys")).kids == keyring.kids


async def test_bad_key_files_fail_loudly(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    garbage = keys_dir / f"{1:020d}-{'A' * 43}.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as info:
        await Keyring.load_or_create(keys_dir)
    assert garbage.name in str(info.value) and "nope" not in str(info.value)

    garbage.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an Ed25519"):
        await Keyring.load_or_create(keys_dir)


async def test_rotation(tmp_path: Path, keyring: Keyring, clock: Clock) -> None:
    issuer = CapabilityIssuer(keyring, clock=clock)
    verifier = CapabilityVerifier(keyring, clock=clock)
    old_kid = keyring.signer_kid
    old_token, _ = issuer.mint_run("run_1", "conn_a", 1, 1, "ck")

    new_kid = await keyring.rotate()
    assert new_kid != old_kid and keyring.signer_kid == new_kid
    assert keyring.kids == (old_kid, new_kid)
    new_token, _ = issuer.mint_run("run_1", "conn_a", 1, 1, "ck")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert jwt.get_unverified_header(old_token)["kid"] == old_kid
    assert verifier.verify(old_token).run_id == verifier.verify(new_token).run_id == "run_1"
    assert [k["kid"] for k in keyring.jwks()["keys"]] == [old_kid, new_kid]

    reloaded = await Keyring.load_or_create(tmp_path / "keys")
    assert reloaded.kids == (old_kid, new_kid) and reloaded.signer_kid == new_kid
    assert all(_mode(p) == 0o600 for p in (tmp_path / "keys").glob("*.pem"))

    # Retiring refuses old tokens at once, cached or not, and deletes the file.
    with pytest.raises(ValueError):
        await keyring.retire(new_kid)
    await keyring.retire(old_kid)
    await keyring.retire("no-such-kid")
    assert list(keyring.kids) == [new_kid]
    assert [p for p in (tmp_path / "keys").glob("*.pem") if old_kid in p.name] == []
    assert "unknown key" in _refused(verifier, old_token).detail
    assert verifier.verify(new_token).typ == "run"


# -- minting and round trips -------------------------------------------------------------------


def test_run_round_trip(issuer: CapabilityIssuer, verifier: CapabilityVerifier,
                        keyring: Keyring) -> None:
    token, claims = issuer.mint_run("run_1", "conn_a", 3, 2, "ck_9")
    assert claims == CapabilityClaims(
        run_id="run_1", connection_id="conn_a", generation=3, epoch=2, checkpoint_id="ck_9",
        case_id=None, typ="run", iat=int(T0), exp=int(T0) + RUN_TTL_MAX, jti=claims.jti,
    )
    assert verifier.verify(token) == claims
    assert verifier.verify(token, typ="run") == claims
    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA", "typ": "JWT", "kid": keyring.signer_kid
    }
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == claims.to_payload() and "cid" not in payload
    assert payload["iss"] == payload["aud"] == "revive"


def test_recovery_round_trip(issuer: CapabilityIssuer, verifier: CapabilityVerifier) -> None:
    token, claims = issuer.mint_recovery("run_1", "conn_a", 2, 3, "ck_9", "case_7")
    assert (claims.typ, claims.case_id, claims.exp - claims.iat) == (
        "recovery", "case_7", RECOVERY_TTL_MAX)
    assert verifier.verify(token, typ="recovery") == claims
    assert jwt.decode(token, options={"verify_signature": False})["cid"] == "case_7"


def test_jti_is_unique(issuer: CapabilityIssuer) -> None:
    jtis = {issuer.mint_run("r", "c", 1, 1, "k")[1].jti for _ in range(50)}
    assert len(jtis) == 50


@pytest.mark.parametrize(
    ("kind", "asked", "expected"),
    [("run", 10_000, RUN_TTL_MAX), ("run", 60, 60), ("run", 1.9, 1),
     ("recovery", 3_600, RECOVERY_TTL_MAX), ("recovery", 30, 30)],
)
def test_ttl_caps(issuer: CapabilityIssuer, kind: str, asked: float, expected: int) -> None:
    if kind == "run":
        _, claims = issuer.mint_run("r", "c", 1, 1, "k", ttl=asked)
    else:
        _, claims = issuer.mint_recovery("r", "c", 1, 1, "k", "case", ttl=asked)
    assert claims.exp - claims.iat == expected


@pytest.mark.parametrize(
    "args",
    [("", "c", 1, 1, "k"), ("r", "", 1, 1, "k"), ("r", "c", 0, 1, "k"), ("r", "c", 1, 0, "k"),
     ("r", "c", True, 1, "k"), ("r", "c", 1, 1, "")],
)
def test_mint_refuses_bad_arguments(issuer: CapabilityIssuer, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        issuer.mint_run(*args)


def test_mint_refuses_bad_ttl_and_case(issuer: CapabilityIssuer) -> None:
    with pytest.raises(ValueError):
        issuer.mint_run("r", "c", 1, 1, "k", ttl=0)
    with pytest.raises(ValueError):
        issuer.mint_recovery("r", "c", 1, 1, "k", "")


# -- refusals ----------------------------------------------------------------------------------


def test_forged_signature(keyring: Keyring, verifier: CapabilityVerifier) -> None:
    impostor = Ed25519PrivateKey.generate()
    token = jwt.encode(_payload(), impostor, algorithm="EdDSA",
                       headers={"kid": keyring.signer_kid})
    assert "signature" in _refused(verifier, token).detail


def test_tampered_payload(issuer: CapabilityIssuer, verifier: CapabilityVerifier) -> None:
    token, _ = issuer.mint_run("run_1", "conn_a", 1, 1, "ck")
    header, _, signature = token.split(".")
    forged = f"{header}.{_b64json(_payload(epc=99))}.{signature}"
    assert "signature" in _refused(verifier, forged).detail
    truncated = token[:-4]
    _refused(verifier, truncated)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(keyring: Keyring, verifier: CapabilityVerifier, alg: str) -> None:
    header = _b64json({"alg": alg, "typ": "JWT", "kid": keyring.signer_kid})
    for tail in ("", "c2ln"):
        _refused(verifier, f"{header}.{_b64json(_payload())}.{tail}")


def _public_secrets(keyring: Keyring) -> list[bytes]:
    public = keyring.signing_key()[1].public_key()
    return [
        public.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        keyring.jwks()["keys"][0]["x"].encode(),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["pem", "raw", "jwk-x"])
@pytest.mark.parametrize("alg", ["HS256", "HS512"])
def test_hmac_with_public_key_is_refused(
    keyring: Keyring, verifier: CapabilityVerifier, index: int, alg: str
) -> None:
    """Algorithm confusion: an HMAC keyed with the (public) verification key."""
    secret = _public_secrets(keyring)[index]
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_b64json({'alg': alg, 'typ': 'JWT', 'kid': keyring.signer_kid})}." \
                    f"{_b64json(_payload())}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    assert "algorithm" in _refused(verifier, f"{signing_input}.{_b64(mac)}").detail


def test_expired_with_small_leeway(issuer: CapabilityIssuer, keyring: Keyring,
                                   clock: Clock) -> None:
    token, claims = issuer.mint_run("r", "c", 1, 1, "k", ttl=60)
    clock.now = claims.exp + 5
    assert CapabilityVerifier(keyring, clock=clock).verify(token) == claims
    clock.now = claims.exp + 5.5  # a fresh verifier: no cache entry to lean on
    assert "expired" in _refused(CapabilityVerifier(keyring, clock=clock), token).detail


def test_issued_in_the_future(keyring: Keyring, verifier: CapabilityVerifier) -> None:
    token = _sign(keyring, _payload(iat=int(T0) + 60, exp=int(T0) + 600))
    assert "future" in _refused(verifier, token).detail


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [({"aud": "someone-else"}, "audience"), ({"aud": ["other"]}, "audience"),
     ({"iss": "evil"}, "issuer")],
)
def test_wrong_audience_or_issuer(keyring: Keyring, verifier: CapabilityVerifier,
                                  overrides: dict[str, Any], reason: str) -> None:
    assert reason in _refused(verifier, _sign(keyring, _payload(**overrides))).detail


def test_unknown_or_missing_kid(keyring: Keyring, verifier: CapabilityVerifier) -> None:
    stranger = Ed25519PrivateKey.generate()
    kid = jwk_thumbprint(stranger.public_key())
    token = jwt.encode(_payload(), stranger, algorithm="EdDSA", headers={"kid": kid})
    assert "unknown key" in _refused(verifier, token).detail
    _, key = keyring.signing_key()
    no_kid = jwt.encode(_payload(), key, algorithm="EdDSA")
    assert "no key" in _refused(verifier, no_kid).detail
    signing_input = f"{_b64json({'alg': 'EdDSA', 'kid': 7})}.{_b64json(_payload())}"
    signature = _b64(key.sign(signing_input.encode()))
    _refused(verifier, f"{signing_input}.{signature}")  # pyjwt rejects a non-string kid


@pytest.mark.parametrize(
    "claim", ["iss", "aud", "typ", "sub", "cnx", "gen", "epc", "chk", "iat", "exp", "jti"]
)
def test_missing_claim(keyring: Keyring, verifier: CapabilityVerifier, claim: str) -> None:
    payload = _payload()
    del payload[claim]
    _refused(verifier, _sign(keyring, payload))


@pytest.mark.parametrize(
    "overrides",
    [{"typ": "admin"}, {"gen": "1"}, {"epc": 1.5}, {"gen": True}, {"epc": 0}, {"sub": 5},
     {"chk": ""}, {"typ": "recovery"}, {"cid": "case_1"}, {"exp": int(T0) + 3600},
     {"exp": int(T0)}],
    ids=["typ", "gen-str", "epc-float", "gen-bool", "epc-zero", "sub-int", "chk-empty",
         "recovery-no-cid", "run-with-cid", "over-cap", "zero-life"],
)
def test_badly_shaped_claims(keyring: Keyring, verifier: CapabilityVerifier,
                             overrides: dict[str, Any]) -> None:
    _refused(verifier, _sign(keyring, _payload(**overrides)))


def test_wrong_typ_when_requested(issuer: CapabilityIssuer,
                                  verifier: CapabilityVerifier) -> None:
    run, _ = issuer.mint_run("r", "c", 1, 1, "k")
    recovery, _ = issuer.mint_recovery("r", "c", 1, 2, "k", "case")
    assert "recovery" in _refused(verifier, run, typ="recovery").detail
    _refused(verifier, recovery, typ="run")
    verifier.verify(run)  # now cached: a hit still honours typ
    _refused(verifier, run, typ="recovery")


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "....", "eyJ.eyJ.sig", "x" * 10_000,
     f"{_b64json({'alg': 'EdDSA'})}.not-base64!.sig", "é.é.é", "\x00"],
)
def test_garbage(verifier: CapabilityVerifier, token: str) -> None:
    _refused(verifier, token)


# -- cache -------------------------------------------------------------------------------------


def _count_decodes(verifier: CapabilityVerifier,
                   monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real: Callable[[str], Any] = verifier._decode

    def counting(token: str) -> Any:
        calls.append(token)
        return real(token)

    monkeypatch.setattr(verifier, "_decode", counting)
    return calls


def test_cache_hit_skips_signature_verify(issuer: CapabilityIssuer,
                                          verifier: CapabilityVerifier,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(verifier, monkeypatch)
    token, claims = issuer.mint_run("r", "c", 1, 1, "k")
    assert [verifier.verify(token) for _ in range(5)] == [claims] * 5
    assert calls == [token]


def test_cache_hit_rechecks_exp(issuer: CapabilityIssuer, verifier: CapabilityVerifier,
                                clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(verifier, monkeypatch)
    token, claims = issuer.mint_run("r", "c", 1, 1, "k", ttl=30)
    verifier.verify(token)
    clock.now = claims.exp + 6
    assert "expired" in _refused(verifier, token).detail
    assert len(calls) == 1  # refused from the cache entry, which is then dropped
    _refused(verifier, token)
    assert len(calls) == 2


def test_failures_are_not_cached(keyring: Keyring, verifier: CapabilityVerifier,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(verifier, monkeypatch)
    token = _sign(keyring, _payload(aud="other"))
    _refused(verifier, token)
    _refused(verifier, token)
    assert len(calls) == 2


def test_cache_is_a_bounded_lru(issuer: CapabilityIssuer, keyring: Keyring, clock: Clock,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = CapabilityVerifier(keyring, clock=clock, cache_size=2)
    calls = _count_decodes(verifier, monkeypatch)
    t1, t2, t3 = (issuer.mint_run(f"r{i}", "c", 1, 1, "k")[0] for i in range(3))
    verifier.verify(t1)
    verifier.verify(t2)
    verifier.verify(t1)  # hit: t1 becomes most recent
    verifier.verify(t3)  # evicts t2, the least recently used
    assert calls == [t1, t2, t3]
    verifier.verify(t1)
    verifier.verify(t3)
    assert calls == [t1, t2, t3]
    verifier.verify(t2)
    assert calls == [t1, t2, t3, t2]
    assert "cached=2" in repr(verifier)


def test_cache_can_be_disabled(issuer: CapabilityIssuer, keyring: Keyring, clock: Clock,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = CapabilityVerifier(keyring, clock=clock, cache_size=0)
    calls = _count_decodes(verifier, monkeypatch)
    token, _ = issuer.mint_run("r", "c", 1, 1, "k")
    verifier.verify(token)
    verifier.verify(token)
    assert len(calls) == 2
    with pytest.raises(ValueError):
        CapabilityVerifier(keyring, cache_size=-1)
    with pytest.raises(ValueError):
        CapabilityVerifier(keyring, leeway=30)
