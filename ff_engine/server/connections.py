"""Connection limits below the app (slowloris): uvicorn's h11 protocol with a header deadline and a cap on open
connections per client address.

* **Header deadline** (``--header-timeout``, default 10 s): a connection must deliver a complete request head
  within the deadline after it opens, and after the first byte of each later request (keep-alive); otherwise it
  is closed.  Between requests an idle connection is closed by uvicorn's ``timeout_keep_alive`` (5 s).  uvicorn's
  ``timeout_keep_alive`` only covers an idle connection that has sent nothing; a client that trickles one header
  byte at a time resets it forever, which is what this closes.
* **Connections per client** (``--max-connections-per-client``, default 32): a new connection from an address
  that already has that many open ones (HTTP or WebSocket) is closed at once.
* The body deadline (``--body-timeout``) is held by ``limits.BodyLimit`` (a 408), the header size by h11's
  ``h11_max_incomplete_event_size`` (uvicorn's default, 16 KiB).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ff_engine.server")


def guarded_h11(header_timeout: float, max_per_client: int) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass with these limits (one class per server: its own connection table)."""
    open_by_client: dict[str, set] = {}

    class GuardedH11(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            host = self.client[0] if self.client else "?"
            live = {t for t in open_by_client.get(host, ()) if not t.is_closing()}  # WebSockets too: by transport
            if len(live) >= max_per_client:
                log.warning("closing a connection from %s: %d already open", host, len(live))
                transport.close()
                return
            live.add(transport)
            open_by_client[host] = live
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._deadline_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            if self.cycle is self._deadline_cycle and not self.transport.is_closing() and not self._upgraded:
                log.info("closing a connection from %s: no complete request head in %.1f s", self.client, header_timeout)
                self.transport.close()

        _upgraded = False

        def handle_websocket_upgrade(self, event) -> None:
            self._upgraded = True
            self._header_timer.cancel()
            super().handle_websocket_upgrade(event)

        _idle = False

        def on_response_complete(self) -> None:
            # An idle keep-alive connection is uvicorn's timeout_keep_alive's to close; the next head's deadline
            # starts with its first byte (data_received).  Closing an idle connection after the header deadline
            # instead would race every client that reuses it a little later (a request met by a closed socket).
            self._header_timer.cancel()
            if self.conn.trailing_data[0]:  # a pipelined request already started: its deadline runs now
                self._arm_header_deadline()
            else:
                self._idle = True
            super().on_response_complete()

        def data_received(self, data: bytes) -> None:
            if self._idle:
                self._idle = False
                self._arm_header_deadline()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return GuardedH11
