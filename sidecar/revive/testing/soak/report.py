"""The soak's verdict, checked against the provider's own side-effect log.

The invariants (issue #9): every action a run completed was executed exactly once by the
provider (no duplicate, no loss); no run was abandoned without a case; every case reached
``closed``; the ledger holds no ``in_flight`` row. Stricter than that, every run must also
complete: a soak whose runs give up has found something even if nothing was duplicated.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from revive.client import derive_idempotency_key
from revive.testing.soak.plan import FAULT_KINDS, RunPlan

__all__ = ["Latency", "RunRecord", "SoakReport", "build_report", "percentile", "render_table"]


@dataclass
class RunRecord:
    """What the driver saw of one run."""

    plan: RunPlan
    completed: bool = False
    error: str | None = None
    injected: set[int] = field(default_factory=set)
    """Indexes into ``plan.faults`` of the faults injected."""
    done_seen: set[int] = field(default_factory=set)
    resumed: list[tuple[str, float]] = field(default_factory=list)
    """(case_id, unix time) of each action that completed after its case's redemption."""
    worker_killed_mid_action: bool | None = None
    trace: list[str] = field(default_factory=list)
    """What happened, timestamped, for reading a failure back (``trace.jsonl``)."""

    def note(self, what: str) -> None:
        self.trace.append(f"{time.time():.3f} {what}")


class Latency(BaseModel):
    """Reconnect → resumed action: from the case's ``reconnected`` transition to the moment
    the action it blocked completed in the resumed run."""

    n: int
    p50_ms: float | None
    p99_ms: float | None


class SoakReport(BaseModel):
    """Every number the soak prints, as the final JSON line."""

    seed: int
    store: str
    sidecars: int
    concurrency: int
    runs: int
    completed: int
    actions_completed: int
    actions_executed: int
    """Side effects the provider actually executed (mails in ``GET /_lab/mails``)."""
    duplicates: int
    losses: int
    foreign_mails: int
    runs_without_case: int
    cases_opened: int
    cases_closed: int
    cases_by_state: dict[str, int]
    cases_by_code: dict[str, int]
    """Provider codes that opened cases: AADSTS700082 is the injected ``kill_grant``; any
    other code is a grant the sidecar believed dead although no fault killed it."""
    in_flight_rows: int
    unknown_rows: int
    faults: dict[str, int]
    reconnects: int
    reconnect_failures: int
    worker_kills_mid_action: int
    reconnect_to_resume_ms: Latency
    retries: dict[str, int]
    wall_s: float
    failures: list[str]
    ok: bool


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _latency(records: Iterable[RunRecord], reconnected_at: Mapping[str, float]) -> Latency:
    samples = [
        (at - reconnected_at[case_id]) * 1000
        for record in records for case_id, at in record.resumed
        if case_id in reconnected_at
    ]
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    return Latency(n=len(samples), p50_ms=None if p50 is None else round(p50, 1),
                   p99_ms=None if p99 is None else round(p99, 1))


def build_report(
    *,
    seed: int, store: str, sidecars: int, concurrency: int,
    records: Sequence[RunRecord],
    mails: Sequence[Mapping[str, Any]],
    cases: Sequence[Mapping[str, Any]],
    reconnected_at: Mapping[str, float],
    in_flight: int, unknown: int,
    faults: Mapping[str, int], retries: Mapping[str, int],
    reconnects: int, reconnect_failures: int, wall_s: float,
) -> SoakReport:
    """Check the invariants and gather the numbers.

    Args:
        records: the driver's view of each run.
        mails: ``GET /_lab/mails`` (each with its stamped ``idempotency_key``).
        cases: ``GET /v1/cases`` at the end.
        reconnected_at: unix time of each resumed case's ``reconnected`` transition.
        in_flight, unknown: ledger rows in those states at the end.
    """
    sent = Counter(m.get("idempotency_key") for m in mails)
    expected: set[str] = set()
    duplicates = losses = 0
    failures: list[str] = []
    for record in records:
        for action in record.plan.actions:
            if not action.mutating:
                continue
            key = derive_idempotency_key(record.plan.run_id, action.key)
            expected.add(key)
            if sent[key] > 1:
                duplicates += 1
                failures.append(f"duplicate: {record.plan.run_id} {action.key} sent {sent[key]}x")
            elif sent[key] == 0 and record.completed:
                losses += 1
                failures.append(f"lost: {record.plan.run_id} {action.key} completed, never sent")
    foreign = sum(n for key, n in sent.items() if key not in expected)
    if foreign:
        failures.append(f"{foreign} mails carry no key of any planned action")
    runs_with_case = {c["run_id"] for c in cases}
    incomplete = [r for r in records if not r.completed]
    without_case = [r for r in incomplete if r.plan.run_id not in runs_with_case]
    for record in incomplete:
        failures.append(f"incomplete: {record.plan.run_id}: {record.error}")
    if without_case:
        failures.append(f"{len(without_case)} runs ended without completing and without a case")
    by_state = Counter(str(c["state"]) for c in cases)
    by_code = Counter(str(c.get("provider_code")) for c in cases)
    not_closed = [c for c in cases if c["state"] != "closed"]
    for case in not_closed:
        failures.append(f"case {case['case_id']} of {case['run_id']} ended {case['state']} "
                        f"(outcome {case.get('outcome')}, action {case.get('action_key')})")
    if in_flight:
        failures.append(f"{in_flight} in_flight rows left in the ledger")
    counted: dict[str, int] = {kind: int(faults.get(kind, 0)) for kind in FAULT_KINDS}
    counted.update({k: int(v) for k, v in faults.items() if k not in counted})
    return SoakReport(
        seed=seed, store=store, sidecars=sidecars, concurrency=concurrency,
        runs=len(records), completed=len(records) - len(incomplete),
        actions_completed=sum(len(r.done_seen) for r in records),
        actions_executed=len(mails), duplicates=duplicates, losses=losses,
        foreign_mails=foreign, runs_without_case=len(without_case),
        cases_opened=len(cases), cases_closed=by_state.get("closed", 0),
        cases_by_state=dict(sorted(by_state.items())),
        cases_by_code=dict(sorted(by_code.items())), in_flight_rows=in_flight,
        unknown_rows=unknown, faults=counted, reconnects=reconnects,
        reconnect_failures=reconnect_failures,
        worker_kills_mid_action=sum(1 for r in records if r.worker_killed_mid_action),
        reconnect_to_resume_ms=_latency(records, reconnected_at),
        retries=dict(sorted(retries.items())), wall_s=round(wall_s, 1),
        failures=failures, ok=not failures,
    )


def render_table(report: SoakReport) -> str:
    """The human-readable summary printed before the JSON line."""
    lat = report.reconnect_to_resume_ms
    rows: list[tuple[str, object]] = [
        ("seed / store / sidecars / concurrency",
         f"{report.seed} / {report.store} / {report.sidecars} / {report.concurrency}"),
        ("runs", report.runs),
        ("completed", report.completed),
        ("actions completed (reads + mails)", report.actions_completed),
        ("actions executed (provider mails)", report.actions_executed),
        ("duplicates", report.duplicates),
        ("losses", report.losses),
        ("runs abandoned without a case", report.runs_without_case),
        ("cases opened / closed", f"{report.cases_opened} / {report.cases_closed}"),
        ("cases by provider code", ", ".join(f"{k} {v}" for k, v in report.cases_by_code.items())),
        ("in_flight rows (unknown rows)", f"{report.in_flight_rows} ({report.unknown_rows})"),
        ("reconnects (failed attempts)", f"{report.reconnects} ({report.reconnect_failures})"),
        ("reconnect -> resumed action p50 / p99 ms",
         f"{lat.p50_ms} / {lat.p99_ms}  (n={lat.n})"),
    ]
    rows += [(f"fault {kind}", n) for kind, n in report.faults.items()]
    rows += [("worker kills that landed mid-action", report.worker_kills_mid_action)]
    rows += [(f"retry {reason}", n) for reason, n in report.retries.items()]
    rows += [("wall time s", report.wall_s), ("verdict", "OK" if report.ok else "FAILED")]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines += [f"! {failure}" for failure in report.failures]
    return "\n".join(lines)
