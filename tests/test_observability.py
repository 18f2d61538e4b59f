"""Health, readiness and Prometheus metrics of a sidecar that has lived through a story."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from revive.lab.settings import LAB_CONNECTION
from revive.testing.story import Story


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_and_readiness(story: Story) -> None:
    health = await story.call("GET", "/healthz")
    assert health.status == 200 and health.body == {"status": "ok"}
    ready = await story.call("GET", "/readyz")
    assert ready.status == 200 and ready.body["status"] == "ready"
    assert ready.body["checks"]["store"] == "ok"


async def test_metrics_tell_the_story(story: Story) -> None:
    token = await story.mint()
    assert (await story.graph("GET", "v1.0/me", token)).status == 200
    await story.provider.fault("unavailable", count=1, retry_after=0)
    assert (await story.graph("GET", "v1.0/me/events", token)).status == 200
    await story.provider.fault("kill_grant")
    failed = await story.send_briefing(token)
    assert failed.status == 424
    assert (await story.graph("GET", "v1.0/me", "garbage")).status == 401

    answer = await story.call("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    samples = _samples(answer.text)
    conn = ("connection", LAB_CONNECTION)

    def value(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({**dict([conn]), **labels}.items())))
        return samples.get(key, 0.0)

    assert value("revive_requests_total", outcome="ok", status="200") == 2
    assert value("revive_requests_total", outcome="recovery-required", status="424") == 1
    assert value("revive_requests_total", outcome="capability-invalid", status="401") == 1
    assert value("revive_retries_total") == 1
    assert value("revive_refreshes_total", result="dead_grant") == 1
    assert value("revive_cases_opened_total") == 1
    assert samples[("revive_cases_open", (("state", "open"),))] == 1
    assert value("revive_upstream_latency_seconds_count") >= 3
    assert not re.search(r"lab_at_|lab_rt_|eyJ", answer.text)  # no token in the scrape
