"""Failure classification: provider policies (YAML) compiled into first-match rules.

``load_policies(dir)`` once at start-up, then ``policy.classify(phase, status, headers, body)``
per upstream answer. See ``policies/README.md`` for the file format.
"""

from revive.classify.loader import load_policies, load_policy
from revive.classify.model import (
    FailureClass,
    HeaderStamp,
    JsonBodyStamp,
    Lookup,
    Phase,
    Policy,
    ProbeSpec,
    ReconcileRule,
    RetryPolicy,
    Stamp,
    Verdict,
)

__all__ = [
    "FailureClass",
    "HeaderStamp",
    "JsonBodyStamp",
    "Lookup",
    "Phase",
    "Policy",
    "ProbeSpec",
    "ReconcileRule",
    "RetryPolicy",
    "Stamp",
    "Verdict",
    "load_policies",
    "load_policy",
]
