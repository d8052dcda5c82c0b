"""Limits on the HTTP layer that uvicorn's httptools protocol leaves open, for a server that may face
clients it does not trust (the API key is checked only once a request's headers are complete).

Measured against uvicorn 0.54 + httptools 0.9 by a review, with no key:
* one header value or request path sent in pieces is joined by `bytes +=`, quadratic: 64 MiB held
  the event loop (every stream's tokens) for seconds, 256 MiB for ~10 s at a time;
* a header block that never ends grew the process by 1.2 GB per GiB sent (no cap on headers);
* connections that send nothing, or trickle a header line or body byte at a time, were never
  closed (uvicorn arms its keep-alive timer only after a response), so a client could hold every
  file descriptor.

`GuardedHttpToolsProtocol` answers 431 past MAX_HEAD_BYTES of request line and headers or
MAX_HEADERS headers, and closes a connection whose headers are not complete `header_timeout`
seconds after it opened (or after its previous request), or whose body is not complete
BODY_TIMEOUT seconds after its headers. The rest is uvicorn's.
"""

from __future__ import annotations

import json

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import error_body

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 120.0  # a 2 MiB body at 20 KB/s


class _Rejected(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_open()

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    # -- the head: size, count and time ---------------------------------------------------------
    def _head_open(self) -> None:
        self._in_head, self._head_bytes, self._tail, self._n_headers, self._rejection = True, 0, b"", 0, None
        self._arm(self.header_timeout, 408, "The request's headers did not arrive in time.")

    def data_received(self, data: bytes) -> None:
        if self._in_head:  # count the head's bytes (not a body sent in the same packet)
            buf = self._tail + data
            end = buf.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = buf[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                return self._reject(431, f"The request line and headers are larger than {MAX_HEAD_BYTES} bytes.")
        # uvicorn's data_received, with a rejection from a callback below answered as itself
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            elif hasattr(self, "_unsupported_upgrade_warning"):  # (uvicorn >= 0.30)
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._rejection is not None:
                return self._reject(*self._rejection)
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection
            self._head_open()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > MAX_HEADERS:
            self._rejection = (431, f"The request has more than {MAX_HEADERS} headers.")
            raise _Rejected  # stops the parser: feed_data raises, and data_received answers 431
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(BODY_TIMEOUT_S, 408, "The request body did not arrive in time.")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_timer()
        super().on_message_complete()

    # -- helpers ----------------------------------------------------------------------------------
    def _arm(self, seconds: float, status: int, message: str) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, self._expired, status, message)

    def _cancel_timer(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _expired(self, status: int, message: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
            self.cycle.disconnected = True  # a body that stopped coming: the app sees the client gone
            self.cycle.message_event.set()
            self.transport.close()
            return
        self._reject(status, message)

    def _reject(self, status: int, message: str) -> None:
        """An error answered on the transport itself (no request reached the app), then close."""
        self._cancel_timer()
        body = json.dumps(error_body(status, message, None, "request_header_fields_too_large" if status == 431
                                     else "request_timeout")).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(status, b"Error")
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, reason, len(body)) + body)
        self.transport.close()
