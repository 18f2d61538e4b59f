"""Issue #9: the chaos soak, short. ``bench/soak.py`` runs the long one (200 runs).

Every fault kind is injected — provider faults, dead grants healed by automated reconnects,
SIGKILLed sidecars and SIGKILLed worker processes — and the invariants are checked against
the fake provider's own log of the mails it sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from revive.testing.postgres import POSTGRES_URL, require_postgres
from revive.testing.soak.driver import SoakConfig, run_soak
from revive.testing.soak.plan import FAULT_KINDS, make_plans
from revive.testing.soak.report import SoakReport, render_table

SEED = 9


@pytest.fixture
def postgres_server() -> str:
    """This machine's PostgreSQL (the soak makes and drops its own schema on it)."""
    require_postgres()
    return POSTGRES_URL


def _mails_planned(runs: int) -> int:
    return sum(a.mutating for plan in make_plans(SEED, runs) for a in plan.actions)


def _check(report: SoakReport, runs: int) -> None:
    table = render_table(report)
    assert report.ok, table
    assert report.runs == report.completed == runs, table
    assert report.duplicates == 0 and report.losses == 0 and report.foreign_mails == 0, table
    # Exactly once, counted from the other side: one mail per mutating action of the plan.
    assert report.actions_executed == _mails_planned(runs), table
    assert report.cases_opened == report.cases_closed > 0, table
    assert report.in_flight_rows == 0, table
    assert report.reconnects > 0 and report.reconnect_to_resume_ms.n > 0, table
    missing = [kind for kind in FAULT_KINDS if report.faults[kind] == 0]
    assert not missing, f"never injected: {missing}\n{table}"


def test_the_plan_is_the_seed_s() -> None:
    first, again = make_plans(SEED, 20), make_plans(SEED, 20)
    assert first == again
    assert {f.kind for plan in first for f in plan.faults} == set(FAULT_KINDS)
    assert make_plans(SEED + 1, 20) != first


@pytest.mark.timeout(300)
async def test_soak_one_sidecar_on_sqlite(tmp_path: Path) -> None:
    report = await run_soak(SoakConfig(
        runs=20, seed=SEED, concurrency=6, workdir=tmp_path, deadline_s=200,
    ))
    _check(report, 20)
    assert report.store == "sqlite" and report.sidecars == 1


@pytest.mark.timeout(300)
async def test_soak_two_sidecars_sharing_postgres(tmp_path: Path, postgres_server: str) -> None:
    report = await run_soak(SoakConfig(
        runs=20, seed=SEED, concurrency=6, store="postgres", postgres_url=postgres_server,
        workdir=tmp_path, deadline_s=200,
    ))
    _check(report, 20)
    assert report.store == "postgres" and report.sidecars == 2
