"""The distributed-mode event bus: NATS JetStream, stream WB_EVENTS on `wb.>`, publishes
deduplicated by `Nats-Msg-Id`, durable pull consumers acked after processing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from workbench.events.bus import (
    BatchHandler,
    ConsumerOptions,
    Handler,
    Subscription,
    backoff_for,
)
from workbench.events.envelope import EventEnvelope

log = logging.getLogger("workbench.bus")


class _Consumer:
    """A consumer loop. stop() lets it finish: the batch in hand is handled and acked (or,
    when the handler overruns the grace period, cancelled and nak'ed so that another replica
    gets it at once instead of after the ack wait). A fetch ends within its 1 s timeout."""

    def __init__(self, grace_s: float) -> None:
        self.stopping = False
        self._grace_s = grace_s
        self._task: asyncio.Task[None] | None = None

    def run(self, coro: Coroutine[Any, Any, None]) -> _Consumer:
        self._task = asyncio.create_task(coro)
        return self

    async def stop(self) -> None:
        self.stopping = True
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=self._grace_s)
        if done:
            return
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=5.0)
        if not done:
            log.warning("a consumer did not stop within %.0f s; leaving it behind",
                        self._grace_s + 5)


class _CoreSub:
    def __init__(self, sub: object) -> None:
        self._sub = sub

    async def stop(self) -> None:
        try:
            await self._sub.unsubscribe()  # type: ignore[attr-defined]
        except Exception:
            pass


class _Pending:
    def __init__(self, bus: JetStreamBus, entry: tuple[str, Handler]) -> None:
        self._bus, self._entry = bus, entry

    async def stop(self) -> None:
        if self._entry in self._bus._pending_broadcasts:
            self._bus._pending_broadcasts.remove(self._entry)


class JetStreamBus:
    def __init__(
        self,
        url: str,
        *,
        stream: str = "WB_EVENTS",
        duplicate_window_s: float = 300.0,
        name: str = "workbench",
        publish_timeout_s: float = 5.0,
        first_connect_timeout_s: float = 5.0,
        stop_grace_s: float = 10.0,
    ) -> None:
        self._url = url
        self._stream = stream
        self._dup_window = duplicate_window_s
        self._name = name
        self._publish_timeout = publish_timeout_s
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._tasks: list[_Consumer] = []
        self._connector: asyncio.Task[None] | None = None
        self._pending_broadcasts: list[tuple[str, Handler]] = []
        self._first_connect_timeout_s = first_connect_timeout_s
        self._stop_grace_s = stop_grace_s

    async def start(self) -> None:
        """Connect, or — when NATS is down — start anyway and keep connecting in the
        background: publishes fail meanwhile (the outbox keeps the events), consumers wait,
        readiness reports the bus as down."""
        try:
            await self._connect_once()
        except Exception as exc:
            log.warning("NATS at %s is unreachable (%s); connecting in the background",
                        self._url, exc)
            self._connector = asyncio.create_task(self._connect_forever(), name="nats-connect")

    async def _connect_once(self) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            log.warning("nats disconnected; reconnecting")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        nc = NatsClient()
        try:
            # nats-py retries a first connection forever with max_reconnect_attempts=-1; the
            # bound is ours, later reconnects are nats-py's.
            await asyncio.wait_for(nc.connect(
                self._url,
                name=self._name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                connect_timeout=2,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            ), timeout=self._first_connect_timeout_s)
        except BaseException:
            try:
                await nc.close()
            except Exception:
                pass
            raise
        self._nc = nc
        self._js = nc.jetstream()
        await self._ensure_stream()
        for subject, handler in self._pending_broadcasts:
            await self._core_subscribe(subject, handler)
        self._pending_broadcasts.clear()

    async def _connect_forever(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._connect_once()
                log.info("NATS at %s is reachable; event bus connected", self._url)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("NATS still unreachable: %s", exc)

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        js = self._jetstream()
        config = StreamConfig(
            name=self._stream,
            subjects=["wb.>"],
            storage=StorageType.FILE,
            duplicate_window=self._dup_window,
        )
        try:
            await js.stream_info(self._stream)
        except NotFoundError:
            await js.add_stream(config)
        self._stream_ready = True

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the event bus is not started")
        return self._js

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            self._connector = None
        for t in self._tasks:
            await t.stop()
        self._tasks.clear()
        if self._nc is not None:
            # Not drain(): it waits for pull subscriptions' queues, which a stopped consumer
            # never empties. Anything unacked is redelivered (consumers are idempotent).
            try:
                await asyncio.wait_for(self._nc.flush(), timeout=2)
            except Exception:
                pass
            await self._nc.close()
            self._nc = None

    async def ping(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise ConnectionError("not connected to NATS")
        await self._nc.flush(timeout=2)

    async def publish(self, event: EventEnvelope) -> None:
        if self._nc is None or not self._nc.is_connected:
            # nats-py buffers publishes while reconnecting; the outbox must know the event
            # did not reach the stream, so a disconnected client is a failed publish.
            raise ConnectionError("not connected to NATS")
        await self._ensure_stream()
        await self._jetstream().publish(
            event.type,
            event.to_bytes(),
            timeout=self._publish_timeout,
            stream=self._stream,
            headers={"Nats-Msg-Id": event.id},
        )

    async def subscribe(
        self,
        durable: str,
        subject: str,
        handler: Handler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        opts = options or ConsumerOptions()
        task = _Consumer(self._stop_grace_s)
        task.run(self._consume(durable, subject, handler, None, opts, task))
        self._tasks.append(task)
        return task

    async def subscribe_batch(
        self,
        durable: str,
        subject: str,
        handler: BatchHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        opts = options or ConsumerOptions()

        async def one(event: EventEnvelope) -> None:
            await handler([event])

        task = _Consumer(self._stop_grace_s)
        task.run(self._consume(durable, subject, one, handler, opts, task))
        self._tasks.append(task)
        return task

    async def _pull_subscription(
        self, durable: str, subject: str, opts: ConsumerOptions
    ) -> JetStreamContext.PullSubscription:
        await self._ensure_stream()
        return await self._jetstream().pull_subscribe(
            subject,
            durable=durable,
            stream=self._stream,
            config=ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_deliver=opts.max_deliver,
                ack_wait=60,
                max_ack_pending=max(opts.batch * 4, 1000),
            ),
        )

    async def _consume(
        self, durable: str, subject: str, handler: Handler,
        batch_handler: BatchHandler | None, opts: ConsumerOptions, control: _Consumer,
    ) -> None:
        """Fetch, handle, ack. With a batch handler the next fetch is already on its way while
        a batch is handled (the batches are still handled one after the other, in order)."""
        sub: JetStreamContext.PullSubscription | None = None
        ahead: asyncio.Task[list[Msg]] | None = None
        in_hand: list[Msg] = []
        try:
            while not control.stopping or ahead is not None:
                if self._js is None:  # not connected yet
                    await asyncio.sleep(0.5)
                    continue
                try:
                    if sub is None:
                        sub = await self._pull_subscription(durable, subject, opts)
                    if ahead is not None:
                        fetching, ahead = ahead, None
                        msgs = await fetching
                    else:
                        msgs = await sub.fetch(opts.batch, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("consumer %s: fetch failed (%s); retrying", durable, exc)
                    sub = None
                    await asyncio.sleep(0.5)
                    continue
                in_hand = list(msgs)
                if batch_handler is not None and not control.stopping:
                    ahead = asyncio.create_task(sub.fetch(opts.batch, timeout=1.0))
                await self._handle(durable, in_hand, handler, batch_handler, opts)
                in_hand = []
        finally:
            # Cancelled mid-batch: give back the batch in hand and the one fetched ahead now,
            # rather than leaving them to come back after ack_wait.
            if ahead is not None:
                try:
                    in_hand += await asyncio.wait_for(ahead, timeout=2.0)
                except BaseException:
                    pass
            for msg in in_hand:
                if not msg.is_acked:
                    try:
                        await msg.nak()
                    except Exception:
                        pass

    async def _handle(self, durable: str, msgs: list[Msg], handler: Handler,
                      batch_handler: BatchHandler | None, opts: ConsumerOptions) -> None:
        decoded: list[tuple[Msg, EventEnvelope]] = []
        for msg in msgs:
            try:
                decoded.append((msg, EventEnvelope.from_bytes(msg.data)))
            except Exception as exc:
                log.error("consumer %s: undecodable message dropped: %s", durable, exc)
                await msg.term()
        if batch_handler is not None and decoded:
            try:
                await batch_handler([e for _, e in decoded])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer %s: batch failed (%s); one event at a time",
                            durable, exc)
            else:
                for msg, _ in decoded:
                    try:
                        await msg.ack()
                    except Exception as exc:
                        log.warning("ack failed: %s", exc)
                return
        for msg, event in decoded:
            attempt = msg.metadata.num_delivered or 1
            try:
                await handler(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt >= opts.max_deliver:
                    log.error(
                        "event parked as dead letter after %d attempts: %s",
                        attempt,
                        exc,
                        extra={"event_id": event.id, "durable": durable},
                    )
                    await msg.term()
                else:
                    log.warning("handler failed (attempt %d): %s", attempt, exc)
                    await msg.nak(delay=backoff_for(opts, attempt))
                continue
            try:
                await msg.ack()
            except Exception as exc:
                # The handler's work is committed; a redelivery is absorbed by the
                # consumer's processed-id table.
                log.warning("ack failed for %s: %s", event.id, exc)

    async def subscribe_broadcast(self, subject: str, handler: Handler) -> Subscription:
        if self._nc is None:
            self._pending_broadcasts.append((subject, handler))
            return _Pending(self, (subject, handler))
        return await self._core_subscribe(subject, handler)

    async def _core_subscribe(self, subject: str, handler: Handler) -> Subscription:
        assert self._nc is not None

        async def on_msg(msg: object) -> None:
            try:
                await handler(EventEnvelope.from_bytes(msg.data))  # type: ignore[attr-defined]
            except Exception:
                log.exception("broadcast handler failed")

        sub = await self._nc.subscribe(subject, cb=on_msg)
        return _CoreSub(sub)
