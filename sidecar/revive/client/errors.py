"""The worker library's own exceptions: what a sidecar problem means to a worker.

The sidecar answers errors as RFC 9457 ``application/problem+json`` with a ``type`` such as
``urn:revive:recovery-required``. This module turns those answers into typed exceptions
without importing anything of the sidecar (a worker installs the client without the server's
dependencies), so the names here mirror, but are not, the classes of ``revive.errors``.

    ReviveClientError                -- anything the client raises on purpose
    └── SidecarProblem               -- the sidecar answered a problem (status, type, body)
        ├── RecoveryRequired (424)   -- dead grant: the run is parked on a recovery case
        ├── Fenced (409)             -- the epoch or generation the worker holds is stale
        ├── ReconcileRequired (409)  -- the action's outcome is unknown; reconcile first
        ├── InFlight (409)           -- the same idempotency key is being executed
        ├── OutcomeUnknown (502)     -- sent, no answer came back; not repeated
        └── CapabilityInvalid (401)  -- missing, expired, forged or burned capability
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "CapabilityInvalid",
    "Fenced",
    "InFlight",
    "OutcomeUnknown",
    "ReconcileRequired",
    "RecoveryCase",
    "RecoveryRequired",
    "ReviveClientError",
    "SidecarProblem",
    "problem_error",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ReviveClientError(Exception):
    """Base of every error the worker library raises on purpose."""


class SidecarProblem(ReviveClientError):
    """The sidecar answered an ``application/problem+json`` error.

    Attributes:
        status: the HTTP status of the answer.
        type: the problem ``type`` (e.g. ``urn:revive:fenced``); ``about:blank`` when absent.
        detail: the problem's human text (never carries a token).
        body: the whole problem document, for fields this library does not model.
    """

    problem_type: ClassVar[str | None] = None

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.type = str(body.get("type") or "about:blank")
        self.detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
        super().__init__(status, self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.detail}"

    @property
    def idempotency_key(self) -> str | None:
        """The ledger key the problem names, when it names one."""
        key = self.body.get("idempotency_key")
        return key if isinstance(key, str) else None


class Fenced(SidecarProblem):
    """409 ``urn:revive:fenced``: the run moved to a newer epoch (or the connection to a newer
    generation) than the one this worker holds; it may neither act nor mint its way back in."""

    problem_type = "urn:revive:fenced"


class ReconcileRequired(SidecarProblem):
    """409 ``urn:revive:reconcile-required``: the action's outcome is ``unknown``; it must be
    settled (``POST /v1/actions/{key}/outcome``) before anything re-executes it."""

    problem_type = "urn:revive:reconcile-required"


class InFlight(SidecarProblem):
    """409 ``urn:revive:in-flight``: another worker is executing the same idempotency key."""

    problem_type = "urn:revive:in-flight"


class OutcomeUnknown(SidecarProblem):
    """502 ``urn:revive:outcome-unknown``: the request was sent but no answer came back.

    The sidecar did not repeat it. A later attempt of the same action meets the ledger, which
    reconciles (the policy's rule, or the worker's ``reconcile``) before re-executing.
    """

    problem_type = "urn:revive:outcome-unknown"


class CapabilityInvalid(SidecarProblem):
    """401 ``urn:revive:capability-invalid``: missing, expired, forged or already redeemed."""

    problem_type = "urn:revive:capability-invalid"


@dataclass(frozen=True, slots=True)
class RecoveryCase:
    """The recovery case a dead grant opened, as the sidecar's 424 problem names it.

    Attributes:
        case_id: the case to reconnect and, once ``ready``, issue a recovery capability for.
        run_id: the parked run.
        checkpoint_id: where the run stood when the grant died (it resumes from there).
        action_key: the action that met the dead grant.
        provider_code: the identity provider's code (e.g. ``AADSTS700082``), when known.
        idempotency_key: the failed action's ledger key, when the 424 came from an action.
        connection_id: the connection whose grant died, when known.
        generation: the dead credential generation, when known.
        detail: the problem's human text (redacted by the sidecar).
        extra: every other field of the problem document.
    """

    case_id: str
    run_id: str | None = None
    checkpoint_id: str | None = None
    action_key: str | None = None
    provider_code: str | None = None
    idempotency_key: str | None = None
    connection_id: str | None = None
    generation: int | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "case_id", "run_id", "checkpoint_id", "action_key", "provider_code",
        "idempotency_key", "connection_id", "generation", "detail",
    )
    _PROBLEM_FIELDS: ClassVar[frozenset[str]] = frozenset({"type", "title", "status", "instance"})

    @classmethod
    def from_problem(cls, body: dict[str, Any]) -> RecoveryCase:
        """Parse a ``urn:revive:recovery-required`` problem document.

        Args:
            body: the decoded problem (``case_id`` is required; other fields are optional).

        Returns:
            the case.

        Raises:
            ValueError: the document names no ``case_id``.
        """
        case_id = body.get("case_id")
        if not isinstance(case_id, str) or not case_id:
            raise ValueError("a recovery-required problem without a case_id")

        def text(name: str) -> str | None:
            value = body.get(name)
            return value if isinstance(value, str) else None

        generation = body.get("generation")
        extra = {
            k: v for k, v in body.items() if k not in cls._FIELDS and k not in cls._PROBLEM_FIELDS
        }
        return cls(
            case_id=case_id, run_id=text("run_id"), checkpoint_id=text("checkpoint_id"),
            action_key=text("action_key"), provider_code=text("provider_code"),
            idempotency_key=text("idempotency_key"), connection_id=text("connection_id"),
            generation=generation if isinstance(generation, int) else None,
            detail=text("detail"), extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The case as plain JSON-able data (a LangGraph interrupt value, a Temporal detail)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in self._FIELDS}
        data["extra"] = dict(self.extra)
        return data


class RecoveryRequired(SidecarProblem):
    """424 ``urn:revive:recovery-required``: the grant is dead and the run is parked on a case.

    Raised by :func:`revive.client.protect_action` when minting a run capability is refused
    (the run already has an open case) or when a proxied request inside ``execute`` met the
    dead grant (the sidecar opened the case). The runtime should wait for the case to become
    ``ready``, obtain its recovery capability, and call ``protect_action`` again with it.

    Not to be confused with the sidecar's own ``revive.errors.RecoveryRequired``, which is
    what the server raises to produce the 424 this class is parsed from.

    Attributes:
        case: the case's fields (``case.case_id``, ``case.provider_code``, ...).
    """

    problem_type = "urn:revive:recovery-required"

    def __init__(self, case: RecoveryCase, status: int = 424,
                 body: dict[str, Any] | None = None) -> None:
        self.case = case
        document = body if body is not None else {
            "type": self.problem_type, "status": status, "detail": case.detail,
            **{k: v for k, v in case.to_dict().items() if k != "extra" and v is not None},
            **case.extra,
        }
        super().__init__(status, document)
        self.args = (case, status, self.body)  # pickles (Temporal, multiprocessing) intact

    def __str__(self) -> str:
        code = f" ({self.case.provider_code})" if self.case.provider_code else ""
        return f"recovery required: case {self.case.case_id}{code}: {self.detail}"


_BY_TYPE: dict[str, type[SidecarProblem]] = {
    cls.problem_type: cls
    for cls in (Fenced, ReconcileRequired, InFlight, OutcomeUnknown, CapabilityInvalid)
    if cls.problem_type is not None
}


def problem_error(status: int, body: Any) -> SidecarProblem:
    """The typed exception for a problem answer.

    Args:
        status: the answer's HTTP status.
        body: the decoded JSON body (anything else yields a plain :class:`SidecarProblem`).

    Returns:
        :class:`RecoveryRequired` (with its case parsed), one of the other typed problems, or
        a plain :class:`SidecarProblem` for any other type.
    """
    document: dict[str, Any] = body if isinstance(body, dict) else {"detail": str(body)[:500]}
    kind = document.get("type")
    if kind == RecoveryRequired.problem_type:
        try:
            return RecoveryRequired(RecoveryCase.from_problem(document), status, document)
        except ValueError:
            return SidecarProblem(status, document)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    return (cls or SidecarProblem)(status, document)
