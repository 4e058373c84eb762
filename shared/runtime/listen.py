"""A service's listening socket, and the hand-over of a port from one process to its successor.

With `reuse_port`, the socket joins the port's SO_REUSEPORT group: a successor binds the port
while the old process still listens on it (a rolling restart, shared/launcher/up.py). The kernel
spreads new connections over the group's sockets; a connection queued on a socket that closes is
reset. So the newest socket steers every new connection to itself (a one-instruction classic BPF
program on the group: "the socket at index 1", the one that joined after the old one), and the old
process closes its socket only once the successor listens: nothing new reaches the old one's
queue, and what was queued there was accepted. Where the steering cannot be attached (not
Linux), the successor still shares the port and the window is the old socket's last queue.
"""
from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51  # Linux, asm-generic/socket.h
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k


def listening_socket(host: str, port: int, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; with `reuse_port`, in the port's
    SO_REUSEPORT group, taking every new connection of that group from now on (`steer_here`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        if reuse_port:
            steer_here(sock)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def steer_here(sock: socket.socket) -> bool:
    """Send the group's new connections to the socket at index 1: this one while the old process
    still listens (it joined second), and, once the old one has closed (this one is index 0 then,
    and index 1 is out of range), the kernel's own choice among what is left. False where the
    program cannot be attached."""
    program = ctypes.create_string_buffer(struct.pack("=HBBI", _BPF_RET_K, 0, 0, 1))  # struct sock_filter
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog: len, filter pointer
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
        return True
    except OSError:
        return False


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on (host, port): a bind without SO_REUSEPORT succeeds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
