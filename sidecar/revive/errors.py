"""Revive's error hierarchy and the one place it maps onto RFC 9457 problem types.

    ReviveError                      -- anything Revive raises on purpose
    ├── ConfigError                  -- bad settings file or env (start-up only)
    ├── PolicyError                  -- bad policy file (start-up / `policies check`)
    ├── CredentialError              -- the identity layer could not give a usable token
    │   ├── DeadGrant                -- only a human reconnect helps           (424)
    │   ├── CredentialUnavailable    -- transient: refresh later                (503)
    │   └── CredentialMisconfigured  -- operator fault, e.g. expired secret     (502)
    └── ProblemError                 -- answered to a caller as problem+json
        ├── RecoveryRequired (424), Fenced (409), InFlight (409),
        ├── IdempotencyMismatch (422), ReconcileRequired (409),
        ├── CapabilityInvalid (401), WebhookSignatureInvalid (401), HostNotAllowed (403),
        ├── UpstreamUnavailable (503), OutcomeUnknown (502),
        └── BadRequest (400), BadTarget (400), NotFound (404),
            UnknownConnection (404), PayloadTooLarge (413), Unauthorized (401)

Decision data lives in attributes (``provider_code``, ``retry_after``), never only in the
message. Messages never carry a token: callers pass redacted evidence only.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ReviveError(Exception):
    """Base of every error Revive raises on purpose."""


class ConfigError(ReviveError):
    """Settings could not be loaded; names the file, the field and the reason."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field, reason
        super().__init__(f"{source}: {field}: {reason}")


class PolicyError(ReviveError):
    """A policy file is invalid; names the file, the rule and the reason."""

    def __init__(self, file: str, rule: str, reason: str) -> None:
        self.file, self.rule, self.reason = file, rule, reason
        super().__init__(f"{file}: {rule}: {reason}")


class CredentialError(ReviveError):
    """The credential source could not produce a usable lease.

    Attributes:
        provider_code: the most specific code the identity layer reported (e.g. ``AADSTS700082``).
        provider_message: the identity layer's own human text, already redacted.
    """

    failure_class: ClassVar[str] = "permanent"

    def __init__(
        self,
        message: str,
        *,
        provider_code: str | None = None,
        provider_message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.provider_code = provider_code
        self.provider_message = provider_message
        self.retry_after = retry_after
        super().__init__(message)


class DeadGrant(CredentialError):
    """The grant is gone (revoked, expired, consent missing): a human must reconnect."""

    failure_class = "dead_grant"


class CredentialUnavailable(CredentialError):
    """The identity layer is failing transiently; the grant is kept."""

    failure_class = "transient"


class CredentialMisconfigured(CredentialError):
    """An operator fault such as an expired client secret: every grant is fine, alert."""

    failure_class = "permanent"


class ProblemError(ReviveError):
    """An error answered to an HTTP caller as ``application/problem+json``.

    Subclasses fix ``type``, ``status`` and ``title``; ``detail`` and ``extra`` vary.
    """

    type: ClassVar[str] = "urn:revive:bad-request"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update({k: v for k, v in self.extra.items() if v is not None})
        return body


class BadRequest(ProblemError):
    type = "urn:revive:bad-request"
    status = 400
    title = "Bad request"


def body_too_slow(seconds: float) -> BadRequest:
    """The refusal of a request body that did not arrive in time (proxy and ``/v1`` alike)."""
    return BadRequest(
        f"the request body did not arrive within {seconds:g} s", timeout_seconds=seconds
    )


class BadTarget(ProblemError):
    type = "urn:revive:bad-target"
    status = 400
    title = "Refused proxy target"


class Unauthorized(ProblemError):
    type = "urn:revive:unauthorized"
    status = 401
    title = "Admin token missing or wrong"


class CapabilityInvalid(ProblemError):
    type = "urn:revive:capability-invalid"
    status = 401
    title = "Capability missing, expired, forged or already used"


class WebhookSignatureInvalid(ProblemError):
    """An identity layer's webhook (Nango's ``X-Nango-Hmac-Sha256``) is unsigned or forged.

    Its own type rather than ``unauthorized``: the fix is the webhook signing key configured
    on both sides, not the admin token.
    """

    type = "urn:revive:webhook-signature-invalid"
    status = 401
    title = "Webhook signature missing or invalid"


class HostNotAllowed(ProblemError):
    type = "urn:revive:host-not-allowed"
    status = 403
    title = "Upstream host outside the connection's allow-list"


class NotFound(ProblemError):
    type = "urn:revive:not-found"
    status = 404
    title = "Not found"


class UnknownConnection(ProblemError):
    type = "urn:revive:unknown-connection"
    status = 404
    title = "Unknown connection"


class MethodNotAllowed(ProblemError):
    type = "urn:revive:method-not-allowed"
    status = 405
    title = "Method not allowed"


class Fenced(ProblemError):
    type = "urn:revive:fenced"
    status = 409
    title = "Stale run epoch or credential generation"


class InFlight(ProblemError):
    type = "urn:revive:in-flight"
    status = 409
    title = "The same idempotency key is being executed"


class ReconcileRequired(ProblemError):
    type = "urn:revive:reconcile-required"
    status = 409
    title = "The action's outcome is unknown; reconcile first"


class PayloadTooLarge(ProblemError):
    type = "urn:revive:payload-too-large"
    status = 413
    title = "Request body too large"


class IdempotencyMismatch(ProblemError):
    type = "urn:revive:idempotency-mismatch"
    status = 422
    title = "Same idempotency key, different request"


class RecoveryRequired(ProblemError):
    type = "urn:revive:recovery-required"
    status = 424
    title = "The grant is dead; a human reconnect is required"


class OutcomeUnknown(ProblemError):
    type = "urn:revive:outcome-unknown"
    status = 502
    title = "The request was sent but no answer came back; it was not repeated"


class SourceMisconfigured(ProblemError):
    type = "urn:revive:source-misconfigured"
    status = 502
    title = "The credential source rejected the sidecar's own configuration"


class UpstreamUnavailable(ProblemError):
    type = "urn:revive:upstream-unavailable"
    status = 503
    title = "Transient failures outlasted the retry budget"


class UpstreamTimeout(ProblemError):
    type = "urn:revive:upstream-timeout"
    status = 504
    title = "The upstream did not answer in time"


class InternalError(ProblemError):
    type = "urn:revive:internal"
    status = 500
    title = "Internal error"


PROBLEM_TYPES: dict[str, int] = {
    cls.type: cls.status
    for cls in (
        BadRequest, BadTarget, Unauthorized, CapabilityInvalid, WebhookSignatureInvalid,
        HostNotAllowed, NotFound,
        UnknownConnection, MethodNotAllowed, Fenced, InFlight, ReconcileRequired,
        PayloadTooLarge, IdempotencyMismatch, RecoveryRequired, OutcomeUnknown,
        SourceMisconfigured, UpstreamUnavailable, UpstreamTimeout, InternalError,
    )
}
"""Every problem ``type`` Revive can answer, with its status: the documented contract."""


def problem_for_credential_error(exc: CredentialError, **context: Any) -> ProblemError:
    """Translate a source failure into what the worker is told (no token, redacted text)."""
    extra: dict[str, Any] = {"provider_code": exc.provider_code, **context}
    if isinstance(exc, DeadGrant):
        return RecoveryRequired(str(exc), provider_message=exc.provider_message, **extra)
    if isinstance(exc, CredentialUnavailable):
        return UpstreamUnavailable(str(exc), retry_after=exc.retry_after, **extra)
    return SourceMisconfigured(str(exc), **extra)
