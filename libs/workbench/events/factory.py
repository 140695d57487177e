"""Picks the event bus for the run mode."""

from __future__ import annotations

from workbench.events.bus import EventBus, InProcessBus
from workbench.events.nats_bus import JetStreamBus
from workbench.settings import BusSettings, CoreSettings, RunMode


def bus_from_settings(core: CoreSettings, bus: BusSettings, *, name: str) -> EventBus:
    if core.mode is RunMode.EMBEDDED:
        return InProcessBus(core.data_dir / "bus" / "events.sqlite3")
    return JetStreamBus(bus.nats_url, stream=bus.nats_stream,
                        duplicate_window_s=bus.nats_duplicate_window_s, name=name,
                       stop_grace_s=bus.consumer_stop_grace_s)
