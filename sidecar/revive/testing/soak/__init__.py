"""The chaos soak (issue #9): many runs of a multi-action workflow through ``protect_action``
against the fake provider, with faults of every kind, checked against the provider's own
side-effect log. ``bench/soak.py`` runs it long; ``tests/bench/test_soak.py`` runs it short.

    from revive.testing.soak.driver import SoakConfig, run_soak
    from revive.testing.soak.report import render_table

    report = await run_soak(SoakConfig(runs=200, seed=1))
    print(render_table(report)); print(report.model_dump_json())

Modules: ``plan`` (seeded workflows and faults), ``runtime`` (the worker and its durable
checkpoint), ``worker`` (the same worker as a killable process: ``python -m
revive.testing.soak worker SPEC``), ``cluster`` (killable sidecars, the operator, the
reconnecting user), ``driver`` (the soak itself), ``report`` (the invariants).

Nothing is imported here: a worker process imports only what it runs, and starts faster.
"""

__all__: list[str] = []
