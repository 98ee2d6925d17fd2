"""Binding and removing the API's Unix socket, with almost no imports: the ``firecracker``
front end binds its socket before it imports anything heavy (logging, h11, the Machine), so a
client's ``connect()`` succeeds within milliseconds of exec (it then waits in the listen
backlog until the event loop runs)."""

from __future__ import annotations

import os
import socket

from ..errors import ConfigError


def bind_unix(path: str, backlog: int = 128) -> socket.socket:
    """A non-blocking listening Unix stream socket at ``path``.

    Like Firecracker, an existing path is refused (clients delete a stale socket first): a
    ConfigError says so, as it does for any other bind failure."""
    if os.path.lexists(path):
        raise ConfigError(f"Failed to open the API socket at: {path}. Check that it is not "
                          "already used (the path exists; remove it if no VMM listens there).")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ConfigError(f"Failed to open the API socket at: {path}: "
                          f"{e.strerror or e}") from None
    return sock


def remove_socket_file(path: str, identity: tuple[int, int] | None = None) -> None:
    """Remove the API socket file; with ``identity`` (st_dev, st_ino) only if the path still
    names that file (another process may have bound a new socket there since)."""
    try:
        if identity is not None:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) != identity:
                return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        import logging

        logging.getLogger(__name__).warning("cannot remove the API socket %s: %s", path,
                                            e.strerror or e)
