"""A port handed from a process to its successor (shared/runtime/listen.py): both bind it
(SO_REUSEPORT), the successor takes every new connection at once, and once the old socket closes
it takes them all; without SO_REUSEPORT a taken port is refused."""
from __future__ import annotations

import socket
import time

import pytest

from shared.launcher.redis_server import free_port
from shared.runtime.listen import listening_socket, port_is_free


def accept_all(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def connect(port: int, n: int) -> list[socket.socket]:
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    time.sleep(0.2)  # the handshakes land in the listeners' queues
    return clients


def test_the_successor_takes_every_new_connection_then_the_port():
    port = free_port()
    old = listening_socket("127.0.0.1", port, reuse_port=True)
    assert not port_is_free("127.0.0.1", port)
    clients = connect(port, 8)
    assert accept_all(old) == 8
    new = listening_socket("127.0.0.1", port, reuse_port=True)
    clients += connect(port, 32)
    assert (accept_all(old), accept_all(new)) == (0, 32)  # steered: none queued on the old socket
    old.close()
    clients += connect(port, 16)
    assert accept_all(new) == 16
    new.close()
    for c in clients:
        c.close()
    assert port_is_free("127.0.0.1", port)


def test_a_taken_port_is_refused_without_reuse_port():
    port = free_port()
    with listening_socket("127.0.0.1", port) as taken:
        assert taken.getsockname()[1] == port
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", port, reuse_port=True)
