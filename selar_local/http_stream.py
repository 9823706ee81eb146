"""One streamed HTTP response for every streaming endpoint (OpenAI's server-sent events, the
Responses API's typed events, Ollama's NDJSON): items framed one by one, and the requests
behind it cancelled when the client goes away (noticed by a watcher on `receive`, whatever
the ASGI spec version) or when the stream ends for any other reason."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse


def cancel_all(handles: list) -> None:
    for handle in handles:
        handle.cancel()


async def until_disconnect(receive, handles: list) -> None:
    """Wait for the client's http.disconnect (the body was read already), then cancel."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                cancel_all(handles)
                return
    except Exception:  # the server may close `receive` at shutdown
        return


def compact_json(item: Any) -> bytes:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()


class CancellingStream(StreamingResponse):
    """`frame(item)` bytes for each item of `items`, then `last`; `on_close` runs once the
    stream is over (e.g. release the model's lease: the stream may never have started)."""

    def __init__(self, items: AsyncIterator[Any], handles: list, frame: Callable[[Any], bytes], *,
                 media_type: str, last: bytes = b"", headers: dict | None = None,
                 on_close: Callable[[], None] | None = None):
        super().__init__(items, media_type=media_type, headers=headers)
        self.items, self.handles, self.frame, self.last, self.on_close = items, handles, frame, last, on_close

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(until_disconnect(receive, self.handles))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for item in self.items:
                await send({"type": "http.response.body", "body": self.frame(item), "more_body": True})
            await send({"type": "http.response.body", "body": self.last, "more_body": False})
        except OSError:  # the client went away mid-stream (ASGI 2.4 servers raise on send)
            pass
        finally:
            watcher.cancel()
            cancel_all(self.handles)  # no-op once the requests have ended
            await self.items.aclose()
            if self.on_close is not None:
                self.on_close()
