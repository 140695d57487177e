"""Safety-net polls that cost little while nothing happens.

The outbox relays, the in-process bus's consumers and the kb ingestion loop are woken at once by
the work they wait for (a commit that wrote events, a publish, an upload) and poll only to catch
what no wake-up announced (a row left by a crashed replica, an event written by another process).
Each poll of an idle platform is a database round trip on the service's event loop, and an
embedded platform runs a dozen such loops: `IdleInterval` lets the wait between polls grow while
they find nothing, and snaps back when there is work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

IDLE_STRETCH = 8  # an idle poller waits at most 8 x its interval between polls


class IdleInterval:
    """The wait before the next poll: `base`, then doubled after each poll that found nothing
    (up to `base * stretch`); back to `base` after a poll that found work or a wake-up."""

    def __init__(self, base: float, stretch: int = IDLE_STRETCH) -> None:
        if base <= 0 or stretch < 1:
            raise ValueError("base must be > 0 and stretch >= 1")
        self.base = base
        self.longest = base * stretch
        self.current = base

    def found(self, work: bool) -> None:
        self.current = self.base if work else min(self.current * 2, self.longest)

    async def wait(self, wake: Awaitable[object]) -> bool:
        """Waits for `wake` (an event's or a condition's `wait()`) at most the current
        interval: True when it came (the interval is back to `base`), False at the timeout."""
        try:
            await asyncio.wait_for(wake, self.current)
        except TimeoutError:
            return False
        self.found(True)
        return True
