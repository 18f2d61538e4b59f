"""Runtime adapters: Revive inside the workflow engines people already run (DESIGN §10).

Each runtime lives in its own optional subpackage, importable only with its extra installed:

- :mod:`revive.adapters.temporal` (``pip install revive[temporal]``)
- :mod:`revive.adapters.langgraph` (``pip install revive[langgraph]``)

This package itself needs neither: it holds the receiving end of the sidecar's case webhook,
which both adapters use to resume a run when its recovery case is ready. Adapters build on
the worker library :mod:`revive.client` only, never on the sidecar's server modules.
"""

from revive.adapters._webhook import (
    SIGNATURE_HEADER,
    CaseEvent,
    OnCaseEvent,
    ResumeGone,
    case_webhook,
    verify_signature,
)

__all__ = [
    "SIGNATURE_HEADER",
    "CaseEvent",
    "OnCaseEvent",
    "ResumeGone",
    "case_webhook",
    "verify_signature",
]
