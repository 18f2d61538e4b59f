"""Hostile input on the data plane, against a real sidecar, black box (issue #9, part 4).

The rig (``revive.testing.hostile_rig``) puts a sidecar on an ephemeral loopback port in
front of the fake provider and of a hostile upstream whose credential is a canary. Each
input here must be refused (problem+json with a type from ``revive.errors``, or a clean
close for malformed HTTP) or bounded, and reach no upstream it was not meant for; after
every test the ``rig`` fixture checks that no provider or admin token reached a client or
the log. Bytes aiohttp's client refuses to send go over a bare socket
(``revive.testing.rawhttp``). Capabilities and admin routes: ``test_hostile_auth.py``.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from revive.app import STORE
from revive.proxy.ledger import derive_idempotency_key
from revive.testing.hostile_rig import (
    CANARY,
    HOSTILE,
    RIG_LIMITS,
    Reply,
    Rig,
    assert_problem,
    assert_refused,
    peak_growth_kb,
    raw_get,
)
from revive.testing.rawhttp import RawAnswer, open_raw, parse_answer, request_bytes

RUN = "run_test"  # what RunningSidecar.capability mints for
MEMORY_BOUND_KB = 128 * 1024  # generous: the bomb inflated whole would take 2 GiB
BAD_TARGET = "urn:revive:bad-target"
BAD_REQUEST = "urn:revive:bad-request"
HOST_NOT_ALLOWED = "urn:revive:host-not-allowed"


# -- request line and headers ------------------------------------------------------------------


RAW_CONTROL_CHARACTERS: dict[str, tuple[bytes, bytes | None]] = {
    "nul-in-path": (b"/proxy/conn_hostile/a\x00b", None),
    "cr-in-path": (b"/proxy/conn_hostile/a\rb", None),
    # A bare LF ends the request line: llhttp then reads an HTTP/0.9 request whose
    # "headers" are whatever followed. It must not be forwarded.
    "lf-in-path": (b"/proxy/conn_hostile/a\nX-Injected: 1", None),
    "crlf-in-path": (b"/proxy/conn_hostile/a\r\nX-Injected: 1\r\n", None),
    "nul-in-header": (b"/proxy/conn_hostile/a", b"v\x00X-Injected: 1"),
    "cr-in-header": (b"/proxy/conn_hostile/a", b"v\rX-Injected: 1"),
    "lf-in-header": (b"/proxy/conn_hostile/a", b"v\nX-Injected: 1"),
    "obs-fold": (b"/proxy/conn_hostile/a", b"v\r\n X-Injected: 1"),
}


async def test_raw_control_characters_are_refused_before_anything_is_sent(rig: Rig) -> None:
    auth = ("Authorization", f"Bearer {rig.capability}")
    for name, (target, header) in RAW_CONTROL_CHARACTERS.items():
        headers = [auth] if header is None else [auth, ("X-Trace-Note", header)]
        answer = await rig.raw(raw_get(target, *headers, close=False))
        assert_refused(answer)
        assert answer.status == 400, name
    assert rig.upstream.seen == []
    await rig.healthy()


ENCODED_CONTROL_CHARACTERS = [
    "a%0d%0aX-Injected:%201",
    "a%0aX-Injected:%201",
    "a%00b",
    "a%7fb",
    "a%250d%250aX-Injected:%201",  # double-encoded CRLF
]
TRAVERSALS = [
    "%2e%2e/%2e%2e/v1/cases",
    "..%2f..%2fv1%2fcases",
    "%2e%2e%2f%2e%2e%2fv1%2fcases",
    ".%2e/.%2e/v1/cases",
    "%2E%2E/admin",
    "%252e%252e/%252e%252e/v1/cases",  # double encoding
    "%252e%252e%252f%252e%252e%252fv1%252fcases",
    "%25252e%25252e/x",  # triple encoding
    "%2525252e%2525252e/x",  # encoded more often than the sidecar decodes at all
    "..%5c..%5cv1%5ccases",  # backslash
    "../../v1/cases",
    "%2f%2fevil.example/x",
    "http:%2f%2fevil.example/x",
    "user@evil.example/x",
]


async def test_encoded_control_characters_and_traversal_are_bad_targets(rig: Rig) -> None:
    auth = ("Authorization", f"Bearer {rig.capability}")
    for tail in ENCODED_CONTROL_CHARACTERS + TRAVERSALS:
        answer = await rig.raw(raw_get(f"/proxy/{HOSTILE}/{tail}", auth))
        assert answer.status == 400, tail
        assert_problem(answer, BAD_TARGET)
    assert rig.upstream.seen == []


async def test_absolute_and_authority_form_targets_never_reach_an_upstream(rig: Rig) -> None:
    auth = ("Authorization", f"Bearer {rig.capability}")
    upstream_authority = rig.upstream.url.removeprefix("http://")
    for target, expected in [
        ("http://evil.example/", "urn:revive:not-found"),
        (f"http://evil.example/proxy/{HOSTILE}/items", BAD_TARGET),
        (f"http://{upstream_authority}/proxy/{HOSTILE}/items", BAD_TARGET),
        (f"https://127.0.0.1:{rig.port}/proxy/{HOSTILE}/items", BAD_TARGET),
    ]:
        answer = await rig.raw(raw_get(target, auth))
        assert_problem(answer, expected)
    for method, target in [
        ("CONNECT", "evil.example:443"),
        ("CONNECT", upstream_authority),
        ("OPTIONS", "*"),
    ]:
        data = request_bytes(method, target, [("Host", target), auth, ("Connection", "close")])
        answer = await rig.raw(data)
        assert_refused(answer)  # aiohttp's own 404 for a target no route can match, then close
        assert answer.status == 404
    assert rig.upstream.seen == []
    await rig.healthy()


async def test_host_and_forwarded_headers_cannot_move_the_upstream(rig: Rig) -> None:
    tricks = {
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "8443",
        "X-Forwarded-For": "169.254.169.254",
        "X-Real-IP": "169.254.169.254",
        "Forwarded": "for=169.254.169.254;host=evil.example;proto=https",
    }
    reply = await rig.call("GET", f"/proxy/{HOSTILE}/items", headers=tricks)
    assert reply.status == 200
    redirect = await rig.call("GET", f"/proxy/{HOSTILE}/hop/0", headers=tricks)
    assert redirect.status == 302
    assert redirect.headers["Location"] == f"/proxy/{HOSTILE}/hop/1"  # not built from Host
    two_hosts = request_bytes("GET", f"/proxy/{HOSTILE}/items", [
        ("Host", "127.0.0.1"), ("Host", "evil.example"),
        ("Authorization", f"Bearer {rig.capability}"),
    ])
    assert_refused(await rig.raw(two_hosts))
    upstream_host = rig.upstream.url.removeprefix("http://")
    assert [path for _, path, _ in rig.upstream.seen] == ["/api/items", "/api/hop/0"]
    for _, _, seen in rig.upstream.seen:
        assert seen["Host"] == upstream_host
        assert seen["Authorization"] == f"Bearer {CANARY}"
        forwarded = {name.lower() for name in seen}
        assert not {name.lower() for name in tricks if name != "Host"} & forwarded


# -- redirects from the upstream ---------------------------------------------------------------


OFF_THE_ALLOW_LIST = [
    "https://evil.example/steal",
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one decimal number
    "http://127.0.0.1@evil.example/",
    "//evil.example/x",
    "gopher://127.0.0.1:6379/_FLUSHALL",  # an allowed host, a scheme that is not
    "javascript:alert(1)",
]


async def test_redirects_off_the_allow_list_are_refused_and_not_followed(rig: Rig) -> None:
    for n, location in enumerate(OFF_THE_ALLOW_LIST):
        reply = await rig.call("GET", f"/proxy/{HOSTILE}/redirect", params={"to": location})
        assert reply.status == 403, location
        assert_problem(reply, HOST_NOT_ALLOWED)
        assert "Location" not in reply.headers
        posted = await rig.call(
            "POST", f"/proxy/{HOSTILE}/redirect", params={"to": location}, json={"n": n},
            headers={"Revive-Action": f"post-redirected-{n}"},
        )
        assert_problem(posted, HOST_NOT_ALLOWED)
        assert "Location" not in posted.headers
        assert len(rig.upstream.seen) == 2 * (n + 1)  # the sidecar never followed one


async def test_a_same_host_redirect_chain_costs_one_upstream_call_per_worker_request(
    rig: Rig,
) -> None:
    location = f"/proxy/{HOSTILE}/hop/0"
    for hop in range(1, 31):  # a worker that follows redirects is bounded by its own client
        reply = await rig.call("GET", location)
        assert reply.status == 302
        location = reply.headers["Location"]
        assert location == f"/proxy/{HOSTILE}/hop/{hop}"
        assert len(rig.upstream.seen) == hop  # the sidecar itself never follows one


# -- size and time bounds ----------------------------------------------------------------------


async def test_huge_headers_are_refused_in_bounded_memory(rig: Rig) -> None:
    auth = ("Authorization", f"Bearer {rig.capability}")
    one_megabyte = raw_get(f"/proxy/{HOSTILE}/a", auth, ("X-Big", "a" * (1 << 20)), close=False)
    ten_thousand = raw_get(
        f"/proxy/{HOSTILE}/a", auth, *[(f"X-H{i}", "v" * 64) for i in range(10_000)], close=False
    )
    long_line = raw_get(f"/proxy/{HOSTILE}/" + "a" * (1 << 20), auth, close=False)
    answers: list[RawAnswer] = []

    async def flood() -> None:
        for data in (one_megabyte, ten_thousand, long_line):
            answers.extend(await asyncio.gather(*(rig.raw(data) for _ in range(8))))

    growth = await peak_growth_kb(flood)
    for answer in answers:
        assert_refused(answer)
        assert answer.status in (400, 413, 414, 431)
    assert rig.upstream.seen == []
    assert growth < MEMORY_BOUND_KB, f"peak RSS grew by {growth} kB"
    await rig.healthy()


async def _slow_post(rig: Rig, action: str, length: int, gap: float) -> RawAnswer:
    """POST a body of ``length`` bytes one byte every ``gap`` s; read the answer when it comes."""
    head = request_bytes(
        "POST", f"/proxy/{HOSTILE}/upload",
        [("Host", "127.0.0.1"), ("Authorization", f"Bearer {rig.capability}"),
         ("Revive-Action", action), ("Content-Type", "application/octet-stream"),
         ("Content-Length", str(length))],
    )
    async with open_raw("127.0.0.1", rig.port) as (reader, writer):
        writer.write(head)

        async def dribble() -> None:
            for _ in range(length - 1):  # never the last byte: the body never completes
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(gap)

        trickle = asyncio.create_task(dribble())
        try:
            return await _answer_after_body_timeout(rig, reader)
        finally:
            trickle.cancel()
            await asyncio.gather(trickle, return_exceptions=True)


async def _answer_after_body_timeout(rig: Rig, reader: asyncio.StreamReader) -> RawAnswer:
    """The sidecar's answer, which must come once the body timeout has passed; recorded."""
    async with asyncio.timeout(RIG_LIMITS.request_body_timeout_seconds + 10):
        raw = await reader.readuntil(b"\r\n\r\n")
        answer = parse_answer(raw)
        raw += await reader.readexactly(int(answer.headers["Content-Length"]))
    answer = parse_answer(raw, closed=False)
    rig.received.append(answer.raw)
    return answer


@pytest.mark.parametrize(
    ("length", "ledger"), [(512, None), (4096, "not_committed")], ids=["buffered", "streamed"]
)
async def test_a_slowloris_body_is_cut_off_while_other_requests_keep_working(
    rig: Rig, length: int, ledger: str | None
) -> None:
    # 512 bytes are buffered before anything is claimed; 4096 (over the replay buffer) are
    # streamed upstream as they come, after the claim: cut short, the action never happened.
    slow = [
        asyncio.create_task(_slow_post(rig, f"upload-{n}", length, gap=0.05)) for n in range(16)
    ]
    for _ in range(10):  # meanwhile, ordinary traffic is served
        await rig.healthy()
    for answer in await asyncio.gather(*slow):
        problem = assert_problem(answer, BAD_REQUEST)
        assert "did not arrive within" in problem["detail"]
    assert not [path for _, path, _ in rig.upstream.seen if path.startswith("/api/upload")]
    store = rig.sidecar.app[STORE]
    for n in range(16):
        action = await store.get_action(derive_idempotency_key(RUN, f"upload-{n}"))
        assert (action.state if action is not None else None) == ledger
    await rig.healthy()


async def test_a_slow_control_body_is_cut_off_too(rig: Rig) -> None:
    """The /v1 routes bound their (small, JSON) bodies by the same timeout as the proxy."""
    head = request_bytes(
        "POST", "/v1/runs/run_slow/capabilities",
        [("Host", "127.0.0.1"), ("Content-Type", "application/json"), ("Content-Length", "64")],
    )
    async with open_raw("127.0.0.1", rig.port) as (reader, writer):
        writer.write(head + b'{"connection_id":')  # and then nothing more
        answer = await _answer_after_body_timeout(rig, reader)
    problem = assert_problem(answer, BAD_REQUEST)
    assert "did not arrive within" in problem["detail"]
    assert await rig.sidecar.app[STORE].get_run("run_slow") is None
    await rig.healthy()


async def test_gzip_bomb_error_answers_are_classified_from_a_bounded_read(
    rig: Rig, bomb: bytes
) -> None:
    for method, status, chunked in itertools.product(("GET", "POST"), (400, 401), (False, True)):
        case = f"{method} {status} chunked={chunked}"
        params = {"chunked": "1"} if chunked else {}
        headers = {"Revive-Action": f"bomb-{status}-{chunked}"} if method == "POST" else {}
        replies: list[Reply] = []

        async def provoke() -> None:
            replies.append(await rig.call(
                method, f"/proxy/{HOSTILE}/bomb/{status}", params=params, headers=headers,
                data=b"{}" if method == "POST" else None,
            ))

        growth = await peak_growth_kb(provoke)
        (reply,) = replies
        assert reply.status == status, case  # permanent, or refreshable and then relayed
        assert reply.headers["Content-Encoding"] == "gzip"
        assert reply.body == bomb, case  # relayed as sent, never inflated on the way
        assert growth < MEMORY_BOUND_KB, f"{case}: peak RSS grew by {growth} kB"


async def test_a_transient_gzip_bomb_is_retried_then_refused_cleanly(rig: Rig) -> None:
    async def provoke() -> None:
        reply = await rig.call("GET", f"/proxy/{HOSTILE}/bomb/503")
        problem = assert_problem(reply, "urn:revive:upstream-unavailable")
        assert problem["upstream_status"] == 503

    growth = await peak_growth_kb(provoke)
    assert len(rig.upstream.seen) == 3  # the oauth2 policy's retry budget, no more
    assert growth < MEMORY_BOUND_KB, f"peak RSS grew by {growth} kB"
