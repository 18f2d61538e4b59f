"""Run and recovery capabilities: EdDSA JWTs minted and verified here (DESIGN §5).

This is the only module that imports pyjwt; its exceptions stop at :meth:`CapabilityVerifier.
verify`, which turns every refusal into :class:`~revive.errors.CapabilityInvalid` with a short
reason and no token text.

Claims on the wire::

    iss="revive" aud="revive" typ=run|recovery sub=run_id cnx=connection_id gen=generation
    epc=epoch chk=checkpoint_id cid=case_id (recovery only) iat exp jti

Time checks (``exp``, ``iat``) use the injected clock, not pyjwt's, so tests can move time and
a cache hit is judged by the same clock as a fresh verify.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import jwt

from revive.errors import CapabilityInvalid
from revive.tokens.keyring import Keyring

__all__ = [
    "ISSUER",
    "AUDIENCE",
    "RUN_TTL_MAX",
    "RECOVERY_TTL_MAX",
    "MAX_LEEWAY",
    "CapabilityType",
    "CapabilityClaims",
    "CapabilityIssuer",
    "CapabilityVerifier",
]

ISSUER: Final = "revive"
AUDIENCE: Final = "revive"
RUN_TTL_MAX: Final = 900
"""Run capabilities live at most 15 minutes; workers renew them."""
RECOVERY_TTL_MAX: Final = 300
"""Recovery capabilities live at most 5 minutes: they may sit in a runtime's history."""
MAX_LEEWAY: Final = 5.0
"""Clock skew tolerated on ``exp``/``iat``, in seconds; more would stretch the TTL caps."""

CapabilityType = Literal["run", "recovery"]
_TTL_MAX: Final[dict[str, int]] = {"run": RUN_TTL_MAX, "recovery": RECOVERY_TTL_MAX}
_ALGORITHM: Final = "EdDSA"
_REQUIRED: Final = ["iss", "aud", "typ", "sub", "cnx", "gen", "epc", "chk", "iat", "exp", "jti"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilityClaims:
    """What a verified capability grants; the typed face of the JWT claims.

    Attributes:
        run_id: ``sub``. connection_id: ``cnx``. generation: ``gen``, the credential
        generation. epoch: ``epc``, the run epoch. checkpoint_id: ``chk``. case_id: ``cid``,
        set on recovery capabilities only. typ: ``run`` or ``recovery``. iat/exp: unix
        seconds. jti: the unique id the store burns at redemption.
    """

    run_id: str
    connection_id: str
    generation: int
    epoch: int
    checkpoint_id: str
    case_id: str | None = None
    typ: CapabilityType
    iat: int
    exp: int
    jti: str

    def to_payload(self) -> dict[str, Any]:
        """The JWT claim set, ``cid`` only on recovery capabilities."""
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "typ": self.typ,
            "sub": self.run_id,
            "cnx": self.connection_id,
            "gen": self.generation,
            "epc": self.epoch,
            "chk": self.checkpoint_id,
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
        }
        if self.case_id is not None:
            payload["cid"] = self.case_id
        return payload


class CapabilityIssuer:
    """Mints capabilities signed by the keyring's current signer.

    Lifetimes are capped (run 15 min, recovery 5 min) whatever the caller asks for: a longer
    TTL would widen the window in which a leaked capability acts.
    """

    def __init__(self, keyring: Keyring, clock: Clock = time.time) -> None:
        self._keyring = keyring
        self._clock = clock

    def __repr__(self) -> str:
        return f"CapabilityIssuer(signer={self._keyring.signer_kid!r})"

    def mint_run(
        self,
        run_id: str,
        connection_id: str,
        generation: int,
        epoch: int,
        checkpoint_id: str,
        ttl: float = RUN_TTL_MAX,
    ) -> tuple[str, CapabilityClaims]:
        """Mint a run capability (DESIGN §4: what a worker presents on every proxied request).

        Args:
            run_id, connection_id, generation, epoch, checkpoint_id: the claims.
            ttl: seconds to live, capped at :data:`RUN_TTL_MAX`.

        Returns:
            ``(token, claims)``.

        Raises:
            ValueError: an empty id, a non-positive generation/epoch, or a TTL under a second.
        """
        return self._mint("run", run_id, connection_id, generation, epoch, checkpoint_id,
                          None, ttl)

    def mint_recovery(
        self,
        run_id: str,
        connection_id: str,
        generation: int,
        epoch: int,
        checkpoint_id: str,
        case_id: str,
        ttl: float = RECOVERY_TTL_MAX,
    ) -> tuple[str, CapabilityClaims]:
        """Mint a single-use recovery capability for a ``ready`` case (DESIGN §8).

        ``generation`` is the new grant's and ``epoch`` the one redemption will install.

        Args:
            run_id, connection_id, generation, epoch, checkpoint_id, case_id: the claims.
            ttl: seconds to live, capped at :data:`RECOVERY_TTL_MAX`.

        Returns:
            ``(token, claims)``.

        Raises:
            ValueError: as for :meth:`mint_run`, or an empty ``case_id``.
        """
        if not case_id:
            raise ValueError("case_id must be a non-empty string")
        return self._mint("recovery", run_id, connection_id, generation, epoch, checkpoint_id,
                          case_id, ttl)

    def _mint(
        self,
        typ: CapabilityType,
        run_id: str,
        connection_id: str,
        generation: int,
        epoch: int,
        checkpoint_id: str,
        case_id: str | None,
        ttl: float,
    ) -> tuple[str, CapabilityClaims]:
        for name, value in (("run_id", run_id), ("connection_id", connection_id),
                            ("checkpoint_id", checkpoint_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        for name, number in (("generation", generation), ("epoch", epoch)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{name} must be a positive integer")
        if not ttl >= 1:
            raise ValueError("ttl must be at least one second")
        iat = int(self._clock())
        claims = CapabilityClaims(
            run_id=run_id,
            connection_id=connection_id,
            generation=generation,
            epoch=epoch,
            checkpoint_id=checkpoint_id,
            case_id=case_id,
            typ=typ,
            iat=iat,
            exp=iat + int(min(ttl, _TTL_MAX[typ])),
            jti=secrets.token_urlsafe(16),
        )
        kid, key = self._keyring.signing_key()
        token = jwt.encode(
            claims.to_payload(),
            key,
            algorithm=_ALGORITHM,
            headers={"kid": kid, "typ": "JWT"},
        )
        return token, claims


class CapabilityVerifier:
    """Checks a capability's signature and claims, with a bounded cache of verified tokens.

    What it checks: the header names ``alg: EdDSA`` and a ``kid`` the keyring holds; the
    Ed25519 signature under that key (pyjwt, ``algorithms=["EdDSA"]`` only, so ``none`` and
    HMAC-with-the-public-key are refused); ``iss``/``aud``; every claim present and typed;
    ``exp`` (and a future ``iat``) against the injected clock with at most
    :data:`MAX_LEEWAY` seconds; a lifetime within the cap for its ``typ``; the ``typ`` asked for.

    What it does NOT check: burned ``jti``s, run epochs and credential generations. Those live
    in the store and change under a token's feet, so the store checks them on every request
    (the fence, DESIGN §4) and burns recovery ``jti``s atomically at redemption.

    The cache maps a token string to its claims until ``exp``: one EdDSA verify costs
    ~140 µs, a hit well under one. A hit still re-checks ``exp``, the requested ``typ`` and
    that the signing kid has not been retired; it is an LRU bounded by ``cache_size``
    (0 disables it).
    """

    def __init__(
        self,
        keyring: Keyring,
        clock: Clock = time.time,
        cache_size: int = 4096,
        leeway: float = MAX_LEEWAY,
    ) -> None:
        """Set up a verifier over ``keyring``'s public keys.

        Args:
            keyring: supplies the verifying key for each ``kid``.
            clock: unix seconds; the same clock judges fresh verifies and cache hits.
            cache_size: verified tokens kept (LRU); 0 disables the cache.
            leeway: clock skew tolerated on ``exp``/``iat``, at most :data:`MAX_LEEWAY`.

        Raises:
            ValueError: a negative ``cache_size`` or a leeway outside [0, 5] s.
        """
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be within [0, {MAX_LEEWAY}] seconds")
        self._keyring = keyring
        self._clock = clock
        self._cache_size = cache_size
        self._leeway = leeway
        self._cache: OrderedDict[str, tuple[CapabilityClaims, str]] = OrderedDict()
        # Time checks are ours (injected clock); pyjwt checks signature, presence, iss, aud.
        self._jwt = jwt.PyJWT(
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": True,
                "verify_iss": True,
                "require": list(_REQUIRED),
            }
        )

    def __repr__(self) -> str:
        return f"CapabilityVerifier(cached={len(self._cache)}, cache_size={self._cache_size})"

    def verify(self, token: str, *, typ: CapabilityType | None = None) -> CapabilityClaims:
        """Return the claims of a valid capability.

        Args:
            token: the compact JWT, e.g. from ``Authorization: Bearer``.
            typ: refuse any other capability type when given.

        Raises:
            CapabilityInvalid: forged, malformed, expired, wrong issuer/audience/type, signed
                by an unknown or retired key, or a required claim is missing.
        """
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            claims, kid = hit
            if kid not in self._keyring:
                del self._cache[token]
                raise CapabilityInvalid("capability signed by an unknown key")
            self._check_time(claims, now, token)
            self._cache.move_to_end(token)
        else:
            claims, kid = self._decode(token)
            self._check_time(claims, now, None)
            if self._cache_size:
                self._cache[token] = (claims, kid)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if typ is not None and claims.typ != typ:
            raise CapabilityInvalid(f"expected a {typ} capability")
        return claims

    def clear_cache(self) -> None:
        """Forget every cached verification (e.g. after retiring a key in bulk)."""
        self._cache.clear()

    def _check_time(self, claims: CapabilityClaims, now: float, cached: str | None) -> None:
        if now > claims.exp + self._leeway:
            if cached is not None:
                self._cache.pop(cached, None)
            raise CapabilityInvalid("capability expired")
        if claims.iat > now + self._leeway:
            raise CapabilityInvalid("capability issued in the future")

    def _decode(self, token: str) -> tuple[CapabilityClaims, str]:
        """The expensive path: header checks, Ed25519 verify, claim parsing.

        pyjwt exceptions are translated here and chained ``from None``: their text or
        context can carry pieces of the token, which must never reach a log.
        """
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise CapabilityInvalid("malformed capability")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise CapabilityInvalid("malformed capability") from None
        if header.get("alg") != _ALGORITHM:
            raise CapabilityInvalid("capability algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise CapabilityInvalid("capability names no key")
        public = self._keyring.public_key(kid)
        if public is None:
            raise CapabilityInvalid("capability signed by an unknown key")
        try:
            payload = self._jwt.decode(
                token, public, algorithms=[_ALGORITHM], audience=AUDIENCE, issuer=ISSUER
            )
        except jwt.InvalidSignatureError:
            raise CapabilityInvalid("capability signature invalid") from None
        except jwt.InvalidAudienceError:
            raise CapabilityInvalid("capability has the wrong audience") from None
        except jwt.InvalidIssuerError:
            raise CapabilityInvalid("capability has the wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise CapabilityInvalid(f"capability lacks claim {exc.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise CapabilityInvalid("capability algorithm not allowed") from None
        except jwt.PyJWTError:
            raise CapabilityInvalid("malformed capability") from None
        return _claims_from(payload), kid


def _claims_from(payload: dict[str, Any]) -> CapabilityClaims:
    """Type-check the claim set: a well-signed token is still refused if its shape is off."""
    typ = payload["typ"]
    if typ not in _TTL_MAX:
        raise CapabilityInvalid("unknown capability type")
    strings = {name: payload[name] for name in ("sub", "cnx", "chk", "jti")}
    numbers = {name: payload[name] for name in ("gen", "epc", "iat", "exp")}
    for name, text in strings.items():
        if not isinstance(text, str) or not text:
            raise CapabilityInvalid(f"capability claim {name!r} is not a string")
    for name, number in numbers.items():
        if isinstance(number, bool) or not isinstance(number, int):
            raise CapabilityInvalid(f"capability claim {name!r} is not an integer")
    if numbers["gen"] < 1 or numbers["epc"] < 1:
        raise CapabilityInvalid("capability generation and epoch must be positive")
    case_id = payload.get("cid")
    if typ == "recovery":
        if not isinstance(case_id, str) or not case_id:
            raise CapabilityInvalid("capability lacks claim 'cid'")
    elif case_id is not None:
        raise CapabilityInvalid("run capability must not name a case")
    if not 0 < numbers["exp"] - numbers["iat"] <= _TTL_MAX[typ]:
        raise CapabilityInvalid("capability lifetime exceeds its cap")
    return CapabilityClaims(
        run_id=strings["sub"],
        connection_id=strings["cnx"],
        generation=numbers["gen"],
        epoch=numbers["epc"],
        checkpoint_id=strings["chk"],
        case_id=case_id,
        typ=cast(CapabilityType, typ),
        iat=numbers["iat"],
        exp=numbers["exp"],
        jti=strings["jti"],
    )
