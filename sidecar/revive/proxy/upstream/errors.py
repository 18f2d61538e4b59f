"""What can go wrong on the upstream hop, sorted by what a retry decision needs to know.

    Exception
     ├── NotSent        the request provably never reached the provider: always safe to repeat
     ├── NoAnswer       it may have reached the provider, but no (whole) answer came back
     │    └── StaleConnection   a reused keep-alive connection was closed under the request
     │                          before any byte of an answer: safe to repeat where a repeat is
     └── BodyFailed     the worker's own streamed body broke off, so no whole request went up

Which exception a socket error becomes is decided once, in this package; nothing above it
ever sees an ``OSError`` or a parser error.
"""

from __future__ import annotations

from revive.errors import ProblemError


class NotSent(Exception):
    """The request provably never reached the provider (connect refused, DNS, timeout, TLS)."""


class NoAnswer(Exception):
    """The request may have reached the provider, but no answer (or only part of one) came back.

    Attributes:
        timed_out: the upstream went silent for longer than the read timeout.
    """

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        self.timed_out = timed_out
        super().__init__(reason)


class StaleConnection(NoAnswer):
    """A pooled connection the provider had closed while idle; nothing of an answer arrived.

    The usual keep-alive race: the provider closes an idle connection just as a request is
    written on it. A request that is safe to repeat is retried once on a fresh connection.
    """


class BodyFailed(Exception):
    """The worker's streamed body failed mid-request; ``problem`` is what the worker is told."""

    def __init__(self, problem: ProblemError) -> None:
        self.problem = problem
        super().__init__(problem.detail)
