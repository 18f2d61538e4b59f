"""Load generation for ``proxy_overhead.py``: wrk when installed, else an aiohttp loop.

Both tools take the same ``LoadSpec`` and return the same ``LoadResult`` so the bench can
subtract latencies measured by one tool only (percentiles from different clients are not
comparable). Each run happens in a child process, away from the server under test.

Run as a script, this module is the aiohttp fallback generator: it reads a ``LoadSpec`` as JSON
from ``argv[1]`` and prints one ``LoadResult`` as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_RESULT_MARK = "BENCH-RESULT "
# A measurement that runs this much past its duration is hung, not slow.
_GRACE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One measurement: who to hit, how hard, for how long."""

    url: str
    method: str  # "GET" or "POST"
    connections: int
    duration_s: float
    warmup_s: float
    headers: dict[str, str] = field(default_factory=dict)
    body_size: int = 0
    # POSTs get a fresh Idempotency-Key and Revive-Action each: a repeated key would be
    # answered from revive's ledger (a replay), which is not the path we want to time.
    unique_keys: bool = False


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one measurement saw. Latencies are microseconds."""

    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int
    socket_errors: int
    tool: str


def body_bytes(size: int) -> bytes:
    """A JSON-looking body of exactly ``size`` bytes, identical for every tool and target."""
    if size <= 0:
        return b""
    head, tail = b'{"pad":"', b'"}'
    if size < len(head) + len(tail):
        return b"x" * size
    return head + b"x" * (size - len(head) - len(tail)) + tail


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run(spec: LoadSpec, tool: str) -> LoadResult:
    """Warm up, then measure ``spec`` with ``tool`` ("wrk" or "aiohttp").

    Raises:
        RuntimeError: the tool failed or printed no result (its stderr is in the message).
    """
    if tool == "wrk":
        return _run_wrk(spec)
    return _run_aiohttp_child(spec)


# --- wrk ---------------------------------------------------------------------------------


def _lua_str(value: str) -> str:
    # JSON string escaping is a subset of what Lua string literals accept.
    return json.dumps(value)


def _wrk_script(spec: LoadSpec, nonce: str) -> str:
    lines = [f"wrk.method = {_lua_str(spec.method)}", "wrk.headers = {}"]
    for name, value in spec.headers.items():
        lines.append(f"wrk.headers[{_lua_str(name)}] = {_lua_str(value)}")
    if spec.body_size:
        lines.append(f"wrk.body = {_lua_str(body_bytes(spec.body_size).decode())}")
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    if spec.unique_keys:
        # Defining request() makes wrk build each request in Lua: a few microseconds, far
        # below what any server here costs, and paid equally by every target.
        lines += [
            "local n = 0",
            "function request()",
            "  n = n + 1",
            "  local h = {}",
            "  for k, v in pairs(wrk.headers) do h[k] = v end",
            f'  h["Idempotency-Key"] = {_lua_str(nonce)} .. "-" .. n',
            '  h["Revive-Action"] = "bench-post-" .. n',
            "  return wrk.format(nil, nil, h, nil)",
            "end",
        ]
    # done() prints exact numbers (microseconds) instead of wrk's rounded, unit-suffixed table.
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        f'  io.write(string.format("{_RESULT_MARK}%d %d %.1f %.1f %d %d\\n",',
        "    summary.requests, summary.duration, latency:percentile(50.0),",
        "    latency:percentile(99.0), e.status, e.connect + e.read + e.write + e.timeout))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def _wrk_once(spec: LoadSpec, seconds: float, script: Path) -> LoadResult:
    # wrk's -d takes whole seconds only. For a fractional duration it gets the next whole
    # second and a SIGINT at the deadline, on which it stops cleanly and still runs done();
    # the rate is computed from the duration wrk itself measured, so this stays exact.
    whole = max(1, math.ceil(seconds))
    cmd = [
        wrk_path() or "wrk",
        "-t1",
        f"-c{spec.connections}",
        f"-d{whole}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        spec.url,
    ]
    fractional = seconds < whole
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            out, err = proc.communicate(timeout=seconds if fractional else whole + _GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            if not fractional:
                raise
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {whole + _GRACE_SECONDS:.0f} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    for line in out.splitlines():
        if line.startswith(_RESULT_MARK):
            requests, duration_us, p50, p99, status, sock = line[len(_RESULT_MARK) :].split()
            duration_s = int(duration_us) / 1e6
            return LoadResult(
                requests=int(requests),
                duration_s=duration_s,
                rps=int(requests) / duration_s if duration_s > 0 else 0.0,
                p50_us=float(p50),
                p99_us=float(p99),
                non_2xx=int(status),
                socket_errors=int(sock),
                tool="wrk",
            )
    detail = (err or out).strip()[:500]
    raise RuntimeError(f"wrk exited {proc.returncode} without a result: {detail}")


def _run_wrk(spec: LoadSpec) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="revive-bench-wrk-") as tmp:
        script = Path(tmp) / "load.lua"
        # Warm-up and measurement use different key prefixes so no key is ever sent twice.
        if spec.warmup_s > 0:
            script.write_text(_wrk_script(spec, f"warm-{uuid.uuid4().hex}"), encoding="utf-8")
            _wrk_once(spec, spec.warmup_s, script)
        script.write_text(_wrk_script(spec, f"run-{uuid.uuid4().hex}"), encoding="utf-8")
        return _wrk_once(spec, spec.duration_s, script)


# --- aiohttp fallback --------------------------------------------------------------------


def _run_aiohttp_child(spec: LoadSpec) -> LoadResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps(asdict(spec))]
    budget = spec.warmup_s + spec.duration_s + _GRACE_SECONDS
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the aiohttp load generator ran past {budget:.0f} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return LoadResult(**json.loads(line[len(_RESULT_MARK) :]))
    raise RuntimeError(
        f"the aiohttp load generator exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    )


def _percentile(sorted_us: list[float], pct: float) -> float:
    if not sorted_us:
        return 0.0
    rank = max(0, math.ceil(pct / 100.0 * len(sorted_us)) - 1)
    return sorted_us[min(rank, len(sorted_us) - 1)]


async def _generate(spec: LoadSpec) -> LoadResult:
    import aiohttp  # imported here so wrk-only runs never need it in this process

    body = body_bytes(spec.body_size) or None
    base_headers = dict(spec.headers)
    if body is not None:
        base_headers["Content-Type"] = "application/json"
    nonce = uuid.uuid4().hex
    counter = 0
    latencies: list[float] = []
    tally = {"non_2xx": 0, "socket_errors": 0}
    connector = aiohttp.TCPConnector(limit=spec.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        auto_decompress=False,
    ) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal counter
            # Bounded by the deadline; each request by the 10 s session timeout.
            while time.perf_counter() < until:
                headers = base_headers
                if spec.unique_keys:
                    counter += 1
                    headers = {
                        **base_headers,
                        "Idempotency-Key": f"{nonce}-{counter}",
                        "Revive-Action": f"bench-post-{counter}",
                    }
                start = time.perf_counter_ns()
                try:
                    async with session.request(
                        spec.method, spec.url, headers=headers, data=body
                    ) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    if record:
                        tally["socket_errors"] += 1
                    continue
                if record:
                    latencies.append((time.perf_counter_ns() - start) / 1000.0)
                    if not 200 <= status < 300:
                        tally["non_2xx"] += 1

        async def phase(seconds: float, record: bool) -> float:
            began = time.perf_counter()
            until = began + seconds
            await asyncio.gather(*(worker(until, record) for _ in range(spec.connections)))
            return time.perf_counter() - began

        if spec.warmup_s > 0:
            await phase(spec.warmup_s, record=False)
        elapsed = await phase(spec.duration_s, record=True)
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        duration_s=elapsed,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50_us=_percentile(latencies, 50.0),
        p99_us=_percentile(latencies, 99.0),
        non_2xx=tally["non_2xx"],
        socket_errors=tally["socket_errors"],
        tool="aiohttp",
    )


def _main(argv: list[str]) -> int:
    spec = LoadSpec(**json.loads(argv[1]))
    runner_kwargs: dict[str, Any] = {}
    try:
        import uvloop

        # The generator should be the fastest thing in the room, so it gets uvloop.
        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(**runner_kwargs) as runner:
        result = runner.run(_generate(spec))
    print(_RESULT_MARK + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(f"usage: {os.path.basename(sys.argv[0])} SPEC_JSON", file=sys.stderr)
        sys.exit(2)
    sys.exit(_main(sys.argv))
