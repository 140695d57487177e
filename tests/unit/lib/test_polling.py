"""IdleInterval: the wait between safety-net polls grows while they find nothing."""

from __future__ import annotations

import asyncio

import pytest

from workbench.polling import IdleInterval


def test_idle_polls_double_the_wait_up_to_the_stretch_and_work_resets_it() -> None:
    idle = IdleInterval(0.5, stretch=8)
    waits = [idle.current]
    for _ in range(5):
        idle.found(False)
        waits.append(idle.current)
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    idle.found(True)
    assert idle.current == 0.5


def test_a_stretch_of_one_keeps_the_interval() -> None:
    idle = IdleInterval(1.0, stretch=1)
    idle.found(False)
    assert idle.current == 1.0


@pytest.mark.parametrize(("base", "stretch"), [(0.0, 8), (-1.0, 8), (1.0, 0)])
def test_bad_settings_are_refused(base: float, stretch: int) -> None:
    with pytest.raises(ValueError):
        IdleInterval(base, stretch)


async def test_wait_returns_on_a_wake_up_and_resets_or_times_out_at_the_current_interval() -> None:
    idle = IdleInterval(0.05)
    idle.found(False)  # 0.1 s now
    event = asyncio.Event()
    event.set()
    assert await idle.wait(event.wait()) is True
    assert idle.current == 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await idle.wait(asyncio.Event().wait()) is False
    assert loop.time() - started >= 0.04
