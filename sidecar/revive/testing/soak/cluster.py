"""The soak's sidecars and its operator.

Each sidecar is a ``revive serve`` process in a :class:`SidecarSlot`: a fixed loopback port,
config and ``sidecar_id``, so a SIGKILLed one comes back exactly as a restarted pod would and
sweeps its own stale ``in_flight`` claims. With PostgreSQL there are two slots sharing the
store, the keys, the admin token and the encrypted grant under one ``data_dir``.

:class:`Cluster` also plays the humans: the operator reading cases through the admin API and
issuing recovery capabilities, and the user who re-consents (connect → provider consent →
callback). One reconnect advances every open case of the connection, so reconnects are
single-flight: a case still open after the lock is taken gets one, the others just wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from revive.config import Settings
from revive.lab.settings import LAB_CONNECTION
from revive.testing.process import sidecar_process, write_config
from revive.testing.provider import RunningProvider
from revive.testing.soak.runtime import Recovery

__all__ = ["Cluster", "SidecarSlot"]

_WAIT_UP_S = 60.0
_RECOVER_S = 120.0
_STUCK_RECONNECTED_S = 3.0
_RECONNECT_TRIES = 12
_OPEN = frozenset({"open", "awaiting_reconnect"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SidecarSlot:
    """One sidecar process that can be SIGKILLed and restarted on the same port."""

    def __init__(self, name: str, config: Path, url: str, log: Path) -> None:
        self.name = name
        self.config = config
        self.url = url
        self.log = log
        self.up = asyncio.Event()
        self.lock = asyncio.Lock()
        self.kills = 0
        self._stack: AsyncExitStack | None = None
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        for attempt in range(5):
            stack = AsyncExitStack()
            try:
                proc, url = await stack.enter_async_context(sidecar_process(self.config, self.log))
            except RuntimeError:  # e.g. the port still held for a moment after a kill
                await stack.aclose()
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if url != self.url:
                await stack.aclose()
                raise RuntimeError(f"sidecar {self.name} came up on {url}, not {self.url}")
            self._stack, self._proc = stack, proc
            self.up.set()
            return
        raise RuntimeError(f"sidecar {self.name} did not restart (see {self.log})")

    async def kill(self) -> None:
        """SIGKILL: no drain, no sweep, whatever was in flight stays in flight."""
        self.up.clear()
        assert self._proc is not None and self._stack is not None
        os.kill(self._proc.pid, signal.SIGKILL)  # not send_signal: see driver._sigkill
        await self._proc.wait()
        await self._stack.aclose()
        self.kills += 1

    async def stop(self) -> None:
        """SIGTERM and wait: the graceful end of the soak."""
        self.up.clear()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self._proc.wait()
            except TimeoutError:
                pass  # the exit stack kills it
        if self._stack is not None:
            await self._stack.aclose()


class Cluster:
    """The sidecars plus the operator's and the user's hands."""

    def __init__(self, provider: RunningProvider, slots: list[SidecarSlot],
                 http: aiohttp.ClientSession, admin_token: str, store_url: str) -> None:
        self.provider = provider
        self.slots = slots
        self.http = http
        self.store_url = store_url
        self.reconnects: list[float] = []
        self.reconnect_failures = 0
        self._admin = {"Authorization": f"Bearer {admin_token}"}
        self._reconnect_lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def start(
        cls, provider: RunningProvider, settings: Settings, workdir: Path, sidecars: int,
    ) -> AsyncIterator[Cluster]:
        """Start ``sidecars`` sidecar processes on ``settings`` (one after the other, so the
        first creates the keys and the admin token the others read); stop them on exit."""
        slots: list[SidecarSlot] = []
        for n in range(sidecars):
            name = "ab"[n] if sidecars <= 2 else str(n)
            port = await asyncio.to_thread(_free_port)
            mine = settings.model_copy(
                update={"listen": f"127.0.0.1:{port}", "sidecar_id": f"soak-{name}"}
            )
            config = await asyncio.to_thread(write_config, mine, workdir / f"sidecar-{name}.yaml")
            slots.append(SidecarSlot(name, config, f"http://127.0.0.1:{port}",
                                     workdir / f"sidecar-{name}.log"))
        try:
            for slot in slots:
                await slot.start()
            token = await asyncio.to_thread(settings.admin_token_path.read_text)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                yield cls(provider, slots, http, token.strip(), settings.store_url)
        finally:
            for slot in slots:
                await slot.stop()

    # -- sidecars -------------------------------------------------------------------------------

    async def any_up(self, prefer: int = 0) -> SidecarSlot:
        """A running sidecar, ``prefer`` first; waits while all are restarting."""
        async with asyncio.timeout(_WAIT_UP_S):
            while True:
                for n in range(len(self.slots)):
                    slot = self.slots[(prefer + n) % len(self.slots)]
                    if slot.up.is_set():
                        return slot
                await asyncio.sleep(0.02)

    async def kill(self, index: int, delay_s: float) -> bool:
        """After ``delay_s``, SIGKILL sidecar ``index`` and restart it; False if it was not up."""
        await asyncio.sleep(delay_s)
        slot = self.slots[index % len(self.slots)]
        async with slot.lock:
            if not slot.up.is_set():
                return False
            await slot.kill()
            await slot.start()
        return True

    # -- the operator -----------------------------------------------------------------------------

    async def admin(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """An admin call on any running sidecar, retried while sidecars restart."""
        async with asyncio.timeout(_WAIT_UP_S):
            while True:
                slot = await self.any_up()
                try:
                    async with self.http.request(
                        method, slot.url + path, headers=self._admin, **kw
                    ) as resp:
                        return resp.status, await resp.json(content_type=None)
                except (aiohttp.ClientError, ConnectionError):
                    await asyncio.sleep(0.05)

    async def case(self, case_id: str) -> dict[str, Any]:
        status, body = await self.admin("GET", f"/v1/cases/{case_id}")
        if status != 200:
            raise RuntimeError(f"GET case {case_id} -> {status}")
        found: dict[str, Any] = body
        return found

    async def cases(self) -> list[dict[str, Any]]:
        status, body = await self.admin("GET", "/v1/cases")
        if status != 200:
            raise RuntimeError(f"GET /v1/cases -> {status}")
        found: list[dict[str, Any]] = body["cases"]
        return found

    async def recover(self, case_id: str) -> Recovery | None:
        """Bring ``case_id`` to ``ready`` (reconnecting if needed) and issue its capability.

        Returns None when the case is already resumed or closed (redeemed before).
        """
        stuck_since: float | None = None
        async with asyncio.timeout(_RECOVER_S):
            while True:
                state = (await self.case(case_id))["state"]
                if state in _OPEN:
                    await self._reconnect_for(case_id, _OPEN)
                    continue
                if state == "ready":
                    status, issued = await self.admin(
                        "POST", f"/v1/cases/{case_id}/capability", json={}
                    )
                    if status == 200:
                        return Recovery(case_id=case_id, epoch=issued["epoch"],
                                        capability=issued["capability"])
                elif state in ("resumed", "closed"):
                    return None
                elif state == "abandoned":
                    raise RuntimeError(f"case {case_id} was abandoned")
                else:  # reconnected: the reconcile runs; a sidecar killed meanwhile leaves it
                    now = time.monotonic()
                    stuck_since = stuck_since or now
                    if now - stuck_since > _STUCK_RECONNECTED_S:
                        await self._reconnect_for(case_id, frozenset({"reconnected"}))
                        stuck_since = None
                await asyncio.sleep(0.05)

    async def _reconnect_for(self, case_id: str, states: frozenset[str]) -> None:
        async with self._reconnect_lock:
            if (await self.case(case_id))["state"] in states:
                await self._reconnect()

    async def _reconnect(self) -> None:
        """The user re-consents: connect, consent at the provider, callback."""
        for attempt in range(_RECONNECT_TRIES):
            slot = await self.any_up()
            try:
                async with self.http.get(
                    f"{slot.url}/v1/connections/{LAB_CONNECTION}/connect", allow_redirects=False
                ) as resp:
                    location = resp.headers.get("Location") if resp.status == 302 else None
                if location is not None:
                    callback = await self.provider.consent(location)
                    async with self.http.get(callback, allow_redirects=False) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.reconnects.append(time.time())
                            return
            except (aiohttp.ClientError, ConnectionError, AssertionError):
                pass  # a sidecar killed mid-flow, or the consent page refused: start over
            self.reconnect_failures += 1
            await asyncio.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"reconnect failed {_RECONNECT_TRIES} times")
