"""Capabilities (DESIGN §5): Ed25519 keys on disk and the JWTs they sign.

``capability`` is the only pyjwt importer in Revive; ``keyring`` uses ``cryptography`` alone.
"""

from revive.tokens.capability import (
    AUDIENCE,
    ISSUER,
    MAX_LEEWAY,
    RECOVERY_TTL_MAX,
    RUN_TTL_MAX,
    CapabilityClaims,
    CapabilityIssuer,
    CapabilityType,
    CapabilityVerifier,
)
from revive.tokens.keyring import Keyring, jwk_thumbprint

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "MAX_LEEWAY",
    "RECOVERY_TTL_MAX",
    "RUN_TTL_MAX",
    "CapabilityClaims",
    "CapabilityIssuer",
    "CapabilityType",
    "CapabilityVerifier",
    "Keyring",
    "jwk_thumbprint",
]
