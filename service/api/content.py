"""Content negotiation (JSON vs HTML vs SSE) and the server-sent-events stream of a job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from quantgate.service.schemas import EventPublic
from quantgate.service.store import Store

__all__ = ["best_match", "job_event_stream"]

SSE_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0
SSE_BATCH = 200


def _parse_accept(header: str) -> list[tuple[str, float, int]]:
    ranges = []
    for position, item in enumerate(header.split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges.append((media.lower(), quality, position))
    return ranges


def best_match(request: Request, offers: Sequence[str]) -> str:
    """The offer the client's Accept header prefers (the first offer on ties or without a header)."""
    header = request.headers.get("accept")
    if not header:
        return offers[0]
    ranges = _parse_accept(header)

    def score(offer: str) -> tuple[float, int, int]:
        best = (0.0, 0, 0)
        kind = offer.split("/")[0]
        for media, quality, position in ranges:
            specificity = 2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if specificity >= 0:
                best = max(best, (quality, specificity, -position))
        return best

    scored = [(score(offer), -index, offer) for index, offer in enumerate(offers)]
    (quality, _, _), _, offer = max(scored)
    return offer if quality > 0 else offers[0]


def _frame(event: EventPublic) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.model_dump(), default=str)}\n\n"


async def job_event_stream(request: Request, store: Store, job_id: str, after: int) -> AsyncIterator[str]:
    """SSE frames for every event after `after`; ends once the job is terminal and fully sent."""
    cursor = after
    idle = 0.0
    yield "retry: 2000\n\n"
    while True:
        events, has_more = await run_in_threadpool(store.list_events, job_id, after=cursor, limit=SSE_BATCH)
        for record in events:
            cursor = record.id
            yield _frame(EventPublic.from_record(record))
        if has_more:
            continue
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None or job.terminal:
            tail, _ = await run_in_threadpool(store.list_events, job_id, after=cursor, limit=SSE_BATCH)
            for record in tail:
                yield _frame(EventPublic.from_record(record))
            return
        if await request.is_disconnected():
            return
        if events:
            idle = 0.0
        else:
            idle += SSE_POLL_S
            if idle >= SSE_HEARTBEAT_S:
                idle = 0.0
                yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)
