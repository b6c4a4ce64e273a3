"""Helpers shared by the fault tests: a TCP proxy that simulates a network outage in front of a server."""

from __future__ import annotations

import select
import socket
import struct
import threading

from conftest import free_port

_POLL_S = 0.05


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`.

    `cut()` is a network outage: the listening socket closes (new connections are refused) and
    every open connection is reset (RST) within 50 ms, so requests in flight fail half-way. The
    server behind it keeps running with its data. `restore()` listens again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._down = threading.Event()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(_POLL_S)
        self._listener, self._down = listener, threading.Event()
        threading.Thread(target=self._accept, args=(listener, self._down), daemon=True).start()

    restore = start

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._down.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket, down: threading.Event) -> None:
        while not down.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst, down), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket, down: threading.Event) -> None:
    """Copy src -> dst until either side closes, or reset both when the proxy is cut."""
    while not down.is_set():
        try:
            if not select.select([src], [], [], _POLL_S)[0]:
                continue
            data = src.recv(1 << 16)
        except (OSError, ValueError):  # ValueError: the other pump closed src
            break
        if not data:
            break
        try:
            dst.sendall(data)
        except OSError:
            break
    for sock in (src, dst):
        try:
            if down.is_set():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
            sock.close()
        except OSError:
            pass
