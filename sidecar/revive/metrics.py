"""Prometheus metrics that cost the hot path a dict increment, not a lock.

prometheus-client's own ``Counter.labels(...).inc()`` takes a lock and a label lookup per
call (~1–2 µs); a proxied GET costs ~90 µs of CPU in all, so two of those would be a
measurable tax. Here the request path only bumps plain dicts (one event loop, no threads
touch them) and a ``Collector`` turns them into metric families when ``/metrics`` is scraped.
Every sidecar has its own registry: nothing global.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Metrics(Collector):
    """The sidecar's counters; the proxy and the recovery service record, scrapes read."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.refreshes: Counter[tuple[str, str]] = Counter()
        self.retries: Counter[str] = Counter()
        self.redemptions: Counter[str] = Counter()
        self.cases_opened: Counter[str] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.open_cases: Mapping[str, int] = {}
        self.grant_expires_in: Mapping[str, float] = {}
        """connection → seconds until its idle grant dies (keep-alive), set at scrape time."""
        self.at_risk: Mapping[tuple[str, str], int] = {}
        """(connection, reason) → 1, refreshed by the ``/metrics`` handler at scrape time."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def request(self, connection: str, outcome: str, status: int) -> None:
        self.requests[(connection, outcome, status)] += 1

    def upstream(self, connection: str, seconds: float) -> None:
        histogram = self.latency.get(connection)
        if histogram is None:
            histogram = self.latency[connection] = _Histogram()
        histogram.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "revive_requests", "Proxied requests by connection, outcome class and status",
            labels=["connection", "outcome", "status"],
        )
        for (conn, outcome, status), n in self.requests.items():
            requests.add_metric([conn, outcome, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "revive_upstream_latency_seconds", "Time to the upstream's answer headers",
            labels=["connection"],
        )
        for conn, hist in self.latency.items():
            latency.add_metric([conn], hist.buckets(), hist.total)
        yield latency
        refreshes = CounterMetricFamily(
            "revive_refreshes", "Token refreshes after a rejection, by result",
            labels=["connection", "result"],
        )
        for (conn, result), n in self.refreshes.items():
            refreshes.add_metric([conn, result], n)
        yield refreshes
        yield _counter("revive_retries", "Transient retries", "connection", self.retries)
        yield _counter("revive_redemptions", "Recovery capability redemptions", "result",
                       self.redemptions)
        yield _counter("revive_cases_opened", "Recovery cases opened", "connection",
                       self.cases_opened)
        yield _gauge("revive_cases_open", "Recovery cases not yet closed, by state", "state",
                     self.open_cases)
        yield _gauge("revive_grant_expires_in_seconds",
                     "Seconds until the provider drops the grant for disuse, unless refreshed",
                     "connection", self.grant_expires_in)
        at_risk = GaugeMetricFamily(
            "revive_connections_at_risk",
            "Connections whose grant works but is expected to die (1 per connection and reason)",
            labels=["connection", "reason"],
        )
        for (conn, reason), n in self.at_risk.items():
            at_risk.add_metric([conn, reason], n)
        yield at_risk


def _counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        family.add_metric([key], n)
    return family


def _gauge(
    name: str, doc: str, label: str, values: Mapping[str, int] | Mapping[str, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        family.add_metric([key], n)
    return family
