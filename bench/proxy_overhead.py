"""What does a request pay for going through the revive sidecar?

Four targets answer the same requests, each in its own process on a loopback ephemeral port:

- ``direct``   the upstream itself (aiohttp on uvloop), the floor;
- ``baseline`` the pass-through proxy a developer writes in 30 lines (aiohttp, default loop);
- ``nginx``    ``proxy_pass`` with upstream keep-alive, when nginx is installed;
- ``revive``   ``revive serve`` with one ``oauth2`` connection on a static token.

For GET and for POST (1 KiB body), at 1 and at 32 connections, one target at a time is loaded
(after a warm-up) by the same tool, so latencies can be subtracted: ``p50_added_us`` is revive's
percentile minus the upstream's. Each measurement is cut into rounds taken in turn across the
targets, so that a host whose speed drifts during the run skews no ratio. The upstream counts requests that arrive without the injected
``Authorization: Bearer bench-token``. The last stdout line is one JSON object.

    .venv/bin/python bench/proxy_overhead.py [--quick] [--duration S] [--rounds N] [--json-only]

Exit status: 0 when everything started and revive answered every request with a 2xx and the
right credential; 1 otherwise (reasons on stderr); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _load  # noqa: E402  (a sibling helper; bench/ is not a package)
from _load import LoadResult, LoadSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLICY_DIR = REPO / "policies"
TOKEN = "bench-token"  # what the upstream must receive
WORKER_TOKEN = "bench-worker"  # what workers send to a proxy, which must replace it
POST_BYTES = 1024
READY_LINE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
TARGETS = ("direct", "baseline", "nginx", "revive")
CASES: dict[str, tuple[str, int]] = {
    "get_c1": ("GET", 1),
    "get_c32": ("GET", 32),
    "post_c1": ("POST", 1),
    "post_c32": ("POST", 32),
}
# A ~200-byte JSON answer, built once, so the upstream does no per-request work for it.
GET_BODY = json.dumps(
    {
        "id": "msg-000001",
        "subject": "quarterly numbers",
        "from": {"name": "Bench Sender", "address": "sender@example.test"},
        "receivedDateTime": "2026-01-01T00:00:00Z",
        "isRead": False,
        "importance": "normal",
        "tags": ["bench", "revive"],
    },
    separators=(",", ":"),
).encode()


def say(message: str) -> None:
    """Progress goes to stderr so stdout stays the table and the JSON line."""
    print(message, file=sys.stderr, flush=True)


# --- the servers that run in child processes (hidden --role) -------------------------------


def _listen_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def _announce(sock: socket.socket) -> None:
    # The socket already listens: connections made from now on wait in the backlog.
    print(f"bench server listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)


def serve_upstream() -> None:
    """The provider stand-in, on uvloop: the fastest honest thing we can put behind a proxy."""
    import uvloop
    from aiohttp import web

    stats = {"requests": 0, "auth_mismatches": 0}
    expected = f"Bearer {TOKEN}"

    def check(request: web.Request) -> None:
        stats["requests"] += 1
        if request.headers.get("Authorization") != expected:
            stats["auth_mismatches"] += 1

    async def get(request: web.Request) -> web.Response:
        check(request)
        return web.Response(body=GET_BODY, content_type="application/json")

    async def post(request: web.Request) -> web.Response:
        check(request)
        body = await request.read()
        return web.json_response({"received": len(body)})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/bench/get", get)
        app.router.add_post("/bench/post", post)
        app.router.add_get("/_stats", get_stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = _listen_socket()
        await web.SockSite(runner, sock, backlog=1024).start()
        _announce(sock)
        await _until_terminated()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# What ``revive serve`` must import whatever it does (pyproject's runtime dependencies): the
# floor under its idle RSS, measured in the same run so the number is read against this machine.
STACK_MODULES = (
    "uvloop", "aiohttp.web", "aiohttp.client", "pydantic", "pydantic_settings", "yaml", "jwt",
    "cryptography.fernet", "cryptography.hazmat.primitives.asymmetric.ed25519",
    "prometheus_client", "sqlite3", "httptools",
)


def serve_stack_floor() -> None:
    """An aiohttp app with one route that imports the runtime stack and uses none of it."""
    import importlib

    import uvloop
    from aiohttp import web

    for name in STACK_MODULES:
        importlib.import_module(name)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/bench/get", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = _listen_socket()
        await web.SockSite(runner, sock).start()
        _announce(sock)
        await _until_terminated()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def serve_baseline(upstream: str) -> None:
    """The 30-line proxy: one pooled session, one header set, streamed answer, default loop."""
    import aiohttp
    from aiohttp import web

    hop = {"connection", "keep-alive", "proxy-authorization", "te", "trailer",
           "transfer-encoding", "upgrade", "host"}  # fmt: skip
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> Any:
        app[session_key] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        headers["Authorization"] = f"Bearer {TOKEN}"
        url = f"{upstream}/{request.match_info['tail']}"
        if request.query_string:
            url += "?" + request.query_string
        data = request.content if request.body_exists else None
        async with request.app[session_key].request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as up:
            out = web.StreamResponse(status=up.status, reason=up.reason)
            out.headers.update({k: v for k, v in up.headers.items() if k.lower() not in hop})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/proxy/bench/{tail:.*}", handle)
    sock = _listen_socket()
    _announce(sock)
    web.run_app(app, sock=sock, print=None, access_log=None)


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --- child process management --------------------------------------------------------------


def _die_with_parent() -> None:
    # Children must not outlive a bench killed with SIGKILL: ask Linux to SIGTERM them.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


@dataclass
class Server:
    """One child process, its log file, and the base URL it answers on once ready."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_ready(self, timeout: float, probe: Callable[[], str | None]) -> None:
        """Poll ``probe`` (returns the URL once ready) until ``timeout``.

        Raises:
            RuntimeError: the process exited or never became ready; carries its log tail.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}"
                )
            url = probe()
            if url:
                self.url = url
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def ready_from_log(self, timeout: float) -> None:
        def probe() -> str | None:
            try:
                match = READY_LINE.search(self.log.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                return None
            return match.group(1) if match else None

        self.wait_ready(timeout, probe)

    def rss_kb(self, field_name: str = "VmRSS") -> int | None:
        """The process's memory plus its children's (revive's SQLite writer is a process)."""
        total = None
        for pid in _process_tree(self.proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
            except OSError:
                continue
            match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                total = (total or 0) + int(match.group(1))
        return total

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        # Each child leads its own session, so its group holds it and only its own workers
        # (nginx's); SIGTERM is a graceful stop for every server here.
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def spawn(name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        # A file, not a pipe: a chatty server can never block on a pipe nobody drains.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            preexec_fn=_die_with_parent,
        )
    return Server(name, proc, log)


def free_port() -> int:
    # Only nginx needs this (it cannot report a port it picked); the race window is tiny.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_conf(root: Path, port: int, upstream_port: int) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {root / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temp}
  upstream bench_upstream {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location /proxy/bench/ {{
      proxy_pass http://bench_upstream/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {TOKEN}";
    }}
  }}
}}
"""


def revive_env() -> dict[str, str]:
    # REVIVE_* from the caller's shell would override the bench's config file (DESIGN §1).
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVIVE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "sidecar"), env.get("PYTHONPATH", "")) if p
    )
    return env


def revive_config(root: Path, upstream_url: str) -> Path:
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"access_token": TOKEN}), encoding="utf-8")
    config = {
        "listen": "127.0.0.1:0",  # the sidecar prints the port it got
        "data_dir": str(root / "data"),
        "policy_dir": str(POLICY_DIR),
        "connections": [
            {
                "id": "bench",
                "provider": "oauth2",
                "base_url": upstream_url,
                "allowed_hosts": ["127.0.0.1"],
                "source": {"kind": "static", "tokens_file": str(tokens)},
            }
        ],
    }
    path = root / "revive.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


# --- plain HTTP checks (http.client: loopback only, never an env-configured proxy) ---------


def fetch(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    host, _, port = url.split("//", 1)[1].split("/", 1)[0].partition(":")
    path = "/" + url.split("//", 1)[1].partition("/")[2]
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def upstream_stats(upstream: Server) -> dict[str, int]:
    status, body = fetch(upstream.url + "/_stats")
    if status != 200:
        raise RuntimeError(f"upstream /_stats answered {status}")
    stats: dict[str, int] = json.loads(body)
    return stats


def preflight(name: str, base: str, headers: dict[str, str]) -> None:
    """One GET and one POST must come back right before any load is spent on a target.

    Raises:
        RuntimeError: with the status and the start of the answer.
    """
    status, body = fetch(base + "/bench/get", headers=headers)
    if status != 200 or body != GET_BODY:
        raise RuntimeError(f"{name}: GET answered {status}: {body[:300]!r}")
    key = f"preflight-{uuid.uuid4().hex}"
    post_headers = {**headers, "Content-Type": "application/json",
                    "Idempotency-Key": key, "Revive-Action": key}  # fmt: skip
    status, body = fetch(base + "/bench/post", "POST", _load.body_bytes(POST_BYTES), post_headers)
    if status != 200 or json.loads(body or b"null") != {"received": POST_BYTES}:
        raise RuntimeError(f"{name}: POST answered {status}: {body[:300]!r}")


def mint_capability(base: str) -> str:
    """A run capability when the sidecar already issues them (DESIGN §4), else a placeholder.

    Raises:
        RuntimeError: the capability route exists but refused.
    """
    payload = {"connection_id": "bench", "checkpoint_id": "bench-checkpoint", "epoch": 1}
    status, body = fetch(
        f"{base}/v1/runs/bench-run/capabilities",
        "POST",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    if status in (404, 405):
        return WORKER_TOKEN  # no capability API yet: any worker bearer is replaced
    if not 200 <= status < 300:
        raise RuntimeError(f"revive: minting a run capability answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    for key in ("capability", "token", "run_capability", "access_token"):
        if isinstance(answer.get(key), str):
            return str(answer[key])
    raise RuntimeError(f"revive: no capability in the mint answer: {body[:300]!r}")


# --- orchestration -------------------------------------------------------------------------


@dataclass
class Bench:
    duration_s: float
    warmup_s: float
    tool: str
    rounds: int = 3
    servers: dict[str, Server] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)  # target -> URL prefix for /bench/...
    worker_auth: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    results: dict[str, dict[str, LoadResult | None]] = field(default_factory=dict)
    mismatches: dict[str, dict[str, int]] = field(default_factory=dict)
    rss_idle_kb: int | None = None
    rss_load_kb: int | None = None
    rss_peak_kb: int | None = None
    rss_floor_kb: int | None = None

    def start(self, stack: ExitStack, root: Path) -> None:
        """Start every target; a proxy that fails is recorded and left out of the measurements.

        Raises:
            RuntimeError: the upstream did not start, so nothing can be measured.
        """
        me = str(Path(__file__).resolve())
        upstream = self._spawn(stack, "upstream", [sys.executable, me, "--role", "upstream"], root)
        upstream.ready_from_log(20)
        self.bases["direct"] = upstream.url
        self.worker_auth["direct"] = f"Bearer {TOKEN}"

        # The proxies start together; each is then waited for with its own deadline.
        pending: dict[str, Callable[[], None]] = {}
        cmd = [sys.executable, me, "--role", "baseline", "--upstream", upstream.url]
        baseline = self._spawn(stack, "baseline", cmd, root)
        pending["baseline"] = lambda: baseline.ready_from_log(20)
        nginx = nginx_binary()
        if nginx is not None:
            pending["nginx"] = self._start_nginx(stack, nginx, root, upstream.url)
        floor = self._spawn(stack, "floor", [sys.executable, me, "--role", "floor"], root)
        pending["floor"] = lambda: floor.ready_from_log(20)
        cmd = [sys.executable, "-m", "revive.cli", "serve", "--config"]
        cmd.append(str(revive_config(root, upstream.url)))
        revive = self._spawn(stack, "revive", cmd, root, env=revive_env())
        pending["revive"] = lambda: revive.ready_from_log(60)

        for name, wait in pending.items():
            if name == "floor":
                try:
                    wait()
                except RuntimeError as exc:
                    self.failures.append(f"the stack-floor process failed to start: {exc}")
                continue
            try:
                wait()
                base = self.servers[name].url + "/proxy/bench"
                auth = mint_capability(self.servers[name].url) if name == "revive" else WORKER_TOKEN
                preflight(name, base, {"Authorization": f"Bearer {auth}"})
            except (RuntimeError, OSError, ValueError) as exc:
                self.failures.append(f"{name} failed to start: {exc}")
                say(f"!! {name} failed to start: {exc}")
                self.servers[name].stop()
                continue
            self.bases[name] = base
            self.worker_auth[name] = f"Bearer {auth}"
        if "revive" in self.bases:
            # "Idle" = started and past its first requests (the preflight), before any load.
            time.sleep(0.5)
            self.rss_idle_kb = revive.rss_kb()
            self.rss_floor_kb = floor.rss_kb()
        floor.stop()  # measured idle only: it takes no part in the load

    def _spawn(
        self,
        stack: ExitStack,
        name: str,
        cmd: list[str],
        root: Path,
        env: dict[str, str] | None = None,
    ) -> Server:
        server = spawn(name, cmd, root, env)
        stack.callback(server.stop)  # registered at once: stopped on every exit path
        self.servers[name] = server
        return server

    def _start_nginx(
        self, stack: ExitStack, binary: str, root: Path, upstream_url: str
    ) -> Callable[[], None]:
        nroot = root / "nginx"
        nroot.mkdir()
        # Root-run nginx workers drop to "nobody": let them traverse into their temp dirs.
        root.chmod(0o711)
        nroot.chmod(0o755)
        port = free_port()
        conf = nroot / "nginx.conf"
        conf.write_text(nginx_conf(nroot, port, int(upstream_url.rsplit(":", 1)[1])))
        # -e: without it nginx first tries the packaged error log, unwritable for most users.
        cmd = [binary, "-e", str(nroot / "error.log"), "-p", str(nroot), "-c", str(conf)]
        server = self._spawn(stack, "nginx", cmd, root)
        url = f"http://127.0.0.1:{port}"
        return lambda: server.wait_ready(10, lambda: url if _connectable(port) else None)

    def measure(self) -> None:
        """Each case, each target, in ``rounds`` interleaved slices of the duration.

        One target after the other, round after round: a machine whose speed drifts during
        the run (a shared host) then slows every target alike, instead of whichever one
        happened to run in the slow minute. A target's rate is its requests over its time
        summed over the rounds; its percentiles are the median of its rounds'.
        """
        for case, (method, conns) in CASES.items():
            slices: dict[str, list[LoadResult]] = {}
            self.mismatches[case] = {}
            for round_index in range(self.rounds):
                for target in TARGETS:
                    if target not in self.bases:
                        continue
                    # The first slice warms a target up; later ones only open fresh connections.
                    warmup = self.warmup_s if round_index == 0 else min(self.warmup_s, 0.3)
                    result = self._slice(case, method, conns, target, warmup)
                    if result is not None:
                        slices.setdefault(target, []).append(result)
            self.results[case] = {
                target: _merge(found) if len(found) == self.rounds else None
                for target, found in slices.items()
            }
            for target in TARGETS:
                if target in self.bases and target not in self.results[case]:
                    self.results[case][target] = None
        revive = self.servers.get("revive")
        if revive is not None and "revive" in self.bases:
            self.rss_load_kb = revive.rss_kb()
            self.rss_peak_kb = revive.rss_kb("VmHWM")

    def _slice(
        self, case: str, method: str, conns: int, target: str, warmup: float
    ) -> LoadResult | None:
        upstream = self.servers["upstream"]
        path = "/bench/get" if method == "GET" else "/bench/post"
        spec = LoadSpec(
            url=self.bases[target] + path,
            method=method,
            connections=conns,
            duration_s=self.duration_s / self.rounds,
            warmup_s=warmup,
            headers={"Authorization": self.worker_auth[target]},
            body_size=POST_BYTES if method == "POST" else 0,
            unique_keys=method == "POST",
        )
        say(f".. {case:<9} {target:<9} {warmup:g} s warm-up + {spec.duration_s:.3g} s")
        before = upstream_stats(upstream)["auth_mismatches"]
        try:
            result: LoadResult | None = _load.run(spec, self.tool)
        except RuntimeError as exc:
            self.failures.append(f"{case} {target}: load run failed: {exc}")
            result = None
        mismatches = upstream_stats(upstream)["auth_mismatches"] - before
        self.mismatches[case][target] = self.mismatches[case].get(target, 0) + mismatches
        server = self.servers.get(target if target != "direct" else "upstream")
        if server is not None and server.proc.poll() is not None:
            self.failures.append(
                f"{target} died under load (status {server.proc.returncode}):\n{server.tail()}"
            )
            del self.bases[target]
        if target == "revive" and result is not None:
            if result.non_2xx or result.socket_errors:
                self.failures.append(
                    f"{case}: revive answered {result.non_2xx} non-2xx and had "
                    f"{result.socket_errors} socket errors"
                )
            if mismatches:
                self.failures.append(
                    f"{case}: {mismatches} requests reached the upstream through revive "
                    "without the injected credential"
                )
        return result

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for case, by_target in self.results.items():
            def rps(target: str) -> float | None:
                result = by_target.get(target)
                return round(result.rps, 1) if result is not None else None

            direct, revive = by_target.get("direct"), by_target.get("revive")
            baseline = by_target.get("baseline")
            ratio = None
            if revive is not None and baseline is not None and baseline.rps > 0:
                ratio = round(revive.rps / baseline.rps, 3)
            added50 = added99 = None
            if revive is not None and direct is not None:
                added50 = round(revive.p50_us - direct.p50_us)
                added99 = round(revive.p99_us - direct.p99_us)
            out[case] = {
                "direct_rps": rps("direct"),
                "baseline_rps": rps("baseline"),
                "nginx_rps": rps("nginx"),
                "revive_rps": rps("revive"),
                "ratio_vs_baseline": ratio,
                "p50_added_us": added50,
                "p99_added_us": added99,
            }
        out["revive_rss_idle_mb"] = _mb(self.rss_idle_kb)
        out["revive_rss_load_mb"] = _mb(self.rss_load_kb)
        out["stack_floor_rss_mb"] = _mb(self.rss_floor_kb)
        return out

    def table(self, summary: dict[str, Any]) -> str:
        rows = [
            f"load: {self.tool} (1 thread), {os.cpu_count()} CPUs, one target at a time, "
            f"{self.duration_s:g} s each in {self.rounds} interleaved rounds "
            f"(first warm-up {self.warmup_s:g} s); POST body {POST_BYTES} B",
            "",
            f"{'case':<9} {'target':<9} {'req/s':>9} {'p50 us':>9} {'p99 us':>9} "
            f"{'non-2xx':>8} {'sock-err':>8} {'no-auth':>8}",
        ]
        for case, by_target in self.results.items():
            for target in TARGETS:
                if target not in by_target and target == "nginx":
                    why = "(not installed)" if nginx_binary() is None else "(not running)"
                    rows.append(f"{case:<9} {target:<9} {why:>9}")
                    continue
                result = by_target.get(target)
                if result is None:
                    rows.append(f"{case:<9} {target:<9} {'failed':>9}")
                    continue
                rows.append(
                    f"{case:<9} {target:<9} {result.rps:>9.0f} {result.p50_us:>9.0f} "
                    f"{result.p99_us:>9.0f} {result.non_2xx:>8} {result.socket_errors:>8} "
                    f"{self.mismatches[case].get(target, 0):>8}"
                )
            s = summary[case]
            rows.append(
                f"{'':<9} revive/baseline = {_fmt(s['ratio_vs_baseline'], '.3f')}, "
                f"added latency vs direct: p50 {_fmt(s['p50_added_us'], '+')} us, "
                f"p99 {_fmt(s['p99_added_us'], '+')} us"
            )
            rows.append("")
        idle, load, peak = (_fmt(_mb(kb), ".1f") for kb in
                            (self.rss_idle_kb, self.rss_load_kb, self.rss_peak_kb))  # fmt: skip
        rows.append(
            f"revive RSS (sidecar + its SQLite writer process): idle {idle} MB, "
            f"after load {load} MB (peak {peak} MB)"
        )
        floor = _fmt(_mb(self.rss_floor_kb), ".1f")
        rows.append(f"stack floor RSS (runtime dependencies imported, one route, idle): {floor} MB")
        return "\n".join(rows)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux: /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def _merge(slices: list[LoadResult]) -> LoadResult:
    """One target's rounds as one result: summed counts, median percentiles."""
    requests = sum(r.requests for r in slices)
    seconds = sum(r.duration_s for r in slices)
    return LoadResult(
        requests=requests,
        duration_s=seconds,
        rps=requests / seconds if seconds > 0 else 0.0,
        p50_us=statistics.median(r.p50_us for r in slices),
        p99_us=statistics.median(r.p99_us for r in slices),
        non_2xx=sum(r.non_2xx for r in slices),
        socket_errors=sum(r.socket_errors for r in slices),
        tool=slices[0].tool,
    )


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _fmt(value: float | int | None, spec: str = "") -> str:
    return "n/a" if value is None else format(value, spec)


class Terminated(Exception):
    """SIGTERM, raised in the main thread so every ``finally`` that stops a child runs."""


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1.5 s per measurement (under 40 s in all)"
    )
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 7)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each measurement")
    parser.add_argument(
        "--rounds", type=int, help="slices each measurement is cut into, interleaved across "
        "targets (default 3; 1 with --quick)",
    )
    parser.add_argument("--tool", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="load generator (auto: wrk when installed)")  # fmt: skip
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--role", choices=("upstream", "baseline", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "upstream":
        serve_upstream()
        return 0
    if args.role == "baseline":
        serve_baseline(args.upstream)
        return 0
    if args.role == "floor":
        serve_stack_floor()
        return 0
    duration = args.duration if args.duration is not None else (1.5 if args.quick else 7.0)
    warmup = args.warmup if args.warmup is not None else (0.4 if args.quick else 1.0)
    if duration <= 0 or warmup < 0:
        say("--duration must be > 0 and --warmup >= 0")
        return 2
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if _load.wrk_path() else "aiohttp"
    elif tool == "wrk" and not _load.wrk_path():
        say("wrk is not installed")
        return 2

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        say("--rounds must be >= 1")
        return 2
    bench = Bench(duration_s=duration, warmup_s=warmup, tool=tool, rounds=rounds)
    began = time.monotonic()
    try:
        with _sigterm_as_exit(), ExitStack() as stack:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="revive-bench-")))
            try:
                bench.start(stack, root)
            except RuntimeError as exc:  # the upstream itself: nothing can be measured
                say(f"!! {exc}")
                return 1
            try:
                bench.measure()
            except (RuntimeError, OSError, ValueError) as exc:  # the upstream stopped answering
                bench.failures.append(f"measurement aborted: {exc}")
    except KeyboardInterrupt:
        say("interrupted; every child process was stopped")
        return 130
    except Terminated:
        say("terminated; every child process was stopped")
        return 143
    summary = bench.summary()
    if not args.json_only:
        print(bench.table(summary))
    print(json.dumps(summary), flush=True)
    say(f"done in {time.monotonic() - began:.1f} s")
    for failure in bench.failures:
        say(f"FAIL: {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
