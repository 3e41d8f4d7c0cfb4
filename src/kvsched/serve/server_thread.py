"""Run a uvicorn server that drains the engine first on shutdown, in the foreground (``kvsched serve``)
or in a background thread (tests, notebooks, embedding in a benchmark)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """On shutdown, first lets the app drain (``app.state.drain``: running requests finish for the drain
    timeout, the rest end with an error event), then shuts uvicorn down as usual.

    uvicorn runs the app's lifespan shutdown only after its own graceful timeout, by which time it has
    cancelled the open handlers and cut their streams mid-body without an error event or ``[DONE]``.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None and not self.force_exit:
            await drain()
        await super().shutdown(sockets)


class UvicornThread:
    """``with UvicornThread(app) as srv: httpx.get(srv.url + "/health")``. Port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = DrainingServer(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the uvicorn server exited during start-up (port in use?)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the uvicorn server did not start within {timeout_s} s")
            time.sleep(0.01)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
