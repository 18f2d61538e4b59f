"""What a soak does, fixed by its seed: each run's workflow and the faults it meets.

Timing inside asyncio is not reproducible, but the plan is: ``make_plans(seed, n)`` returns
the same workflows and the same faults (kind, action, parameters) for the same arguments, so
a failing seed names a failing scenario. Faults are drawn from every kind; the first runs
each lead with a different kind (in a seeded order) so that even a short soak covers them all.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "FAULT_KINDS",
    "PROVIDER_FAULTS",
    "ActionKind",
    "ActionSpec",
    "Fault",
    "FaultKind",
    "RunPlan",
    "make_plans",
]

FaultKind = Literal[
    "expire_token", "kill_grant", "claims_challenge", "unavailable", "rate_limit", "latency",
    "commit_then_drop", "commit_then_stall", "sidecar_kill", "worker_kill",
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "expire_token", "kill_grant", "claims_challenge", "unavailable", "rate_limit", "latency",
    "commit_then_drop", "commit_then_stall", "sidecar_kill", "worker_kill",
)
PROVIDER_FAULTS = frozenset(FAULT_KINDS[:8])
"""Kinds armed through the provider's ``POST /_lab/faults``; the others are process kills."""

_AT_A_MAIL = frozenset({"commit_then_drop", "commit_then_stall", "sidecar_kill", "worker_kill"})
"""Kinds that only bite a side effect: they are placed before a mutating action."""

ActionKind = Literal["read_events", "read_profile", "send_mail"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActionSpec(_Frozen):
    """One step of a run's workflow; ``key`` is the stable action key ``protect_action`` gets."""

    key: str
    kind: ActionKind

    @property
    def mutating(self) -> bool:
        return self.kind == "send_mail"


class Fault(_Frozen):
    """One fault, injected when its run first reaches action ``at``.

    Attributes:
        count, retry_after, ms: the provider fault's parameters, where it takes them.
        slot: which sidecar a ``sidecar_kill`` kills (modulo the number of sidecars).
        delay_ms: how long after the action starts a kill lands.
        stall: arm ``commit_then_stall`` first, so the kill lands between the provider's
            commit and the ledger's (the window issue #3 is about).
    """

    kind: FaultKind
    at: int
    count: int | None = None
    retry_after: int | None = None
    ms: int | None = None
    slot: int = 0
    delay_ms: int = 0
    stall: bool = False


class RunPlan(_Frozen):
    """A run: its id, its workflow and its faults (at most one ``worker_kill``)."""

    index: int
    run_id: str
    actions: tuple[ActionSpec, ...]
    faults: tuple[Fault, ...]

    @property
    def worker_kill(self) -> Fault | None:
        return next((f for f in self.faults if f.kind == "worker_kill"), None)

    def faults_at(self, index: int) -> tuple[Fault, ...]:
        return tuple(f for f in self.faults if f.at == index)


def _workflow(rng: random.Random) -> tuple[ActionSpec, ...]:
    actions = [ActionSpec(key="read-calendar", kind="read_events")]
    for n in range(rng.choice((1, 2, 2, 3))):
        actions.append(ActionSpec(key=f"send-mail-{n + 1}", kind="send_mail"))
        if n == 0 and rng.random() < 0.5:
            actions.append(ActionSpec(key="read-profile", kind="read_profile"))
    return tuple(actions)


def _fault(rng: random.Random, kind: FaultKind, actions: tuple[ActionSpec, ...]) -> Fault:
    mails = [i for i, a in enumerate(actions) if a.mutating]
    at = rng.choice(mails) if kind in _AT_A_MAIL else rng.randrange(len(actions))
    # Every draw happens whatever the kind, so one kind's parameters never shift the next run.
    count, retry_after = rng.randint(1, 3), rng.choice((None, 0, 1))
    ms, slot = rng.choice((100, 300, 800)), rng.randrange(2)
    delay_ms, stall = rng.randint(0, 500), rng.random() < 0.6
    match kind:
        case "unavailable":
            return Fault(kind=kind, at=at, count=count, retry_after=retry_after)
        case "rate_limit":
            return Fault(kind=kind, at=at, count=min(count, 2), retry_after=retry_after or 0)
        case "latency":
            return Fault(kind=kind, at=at, count=count, ms=ms)
        case "commit_then_stall":
            return Fault(kind=kind, at=at, ms=ms * 2)
        case "sidecar_kill":
            return Fault(kind=kind, at=at, slot=slot, delay_ms=delay_ms, stall=stall)
        case "worker_kill":
            return Fault(kind=kind, at=at, delay_ms=delay_ms, stall=stall)
        case _:
            return Fault(kind=kind, at=at)


def make_plans(seed: int, runs: int) -> list[RunPlan]:
    """The soak's runs for ``seed``: the same list every time for the same arguments.

    Args:
        seed: the soak's seed; run ids embed it, so two seeds never share a run.
        runs: how many runs.

    Returns:
        one plan per run, in order.
    """
    rng = random.Random(seed)
    lead = list(FAULT_KINDS)
    rng.shuffle(lead)
    plans: list[RunPlan] = []
    for index in range(runs):
        actions = _workflow(rng)
        kinds: list[FaultKind] = [lead[index]] if index < len(lead) else []
        kinds += rng.choices(FAULT_KINDS, k=rng.choice((0, 1, 1, 2)))
        faults: list[Fault] = []
        for kind in kinds:
            if kind == "worker_kill" and any(f.kind == kind for f in faults):
                continue  # the first leg runs in a process that can be killed once
            faults.append(_fault(rng, kind, actions))
        plans.append(RunPlan(
            index=index, run_id=f"soak-{seed}-{index:04d}", actions=actions,
            faults=tuple(sorted(faults, key=lambda f: f.at)),
        ))
    return plans
