"""The network blocked for HELM's data loading, so a benchmark that would download is caught before training.

The hook evaluates offline: every file a HELM run needs must already be in `data_dir`. A scenario or a data
augmentation whose files are absent downloads them (a `wget`/`gdown` run through `helm.common.general.shell`,
or a Python connection); inside `network_blocked` each such attempt raises `NetworkBlocked`, naming what it
tried to reach. Only the calling thread is blocked: training's and W&B's own threads keep their connections.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class NetworkBlocked(RuntimeError):
    """A download was attempted where the hook allows none."""


_blocked: set[int] = set()  # the threads inside `network_blocked`
_lock = threading.Lock()
_originals: dict[str, Any] = {}


def _refuse(what: str) -> None:
    raise NetworkBlocked(f"it tried to download ({what})")


def _guard(name: str, describe) -> Any:
    original = _originals[name]

    def guarded(*args, **kwargs):
        if threading.get_ident() in _blocked:
            _refuse(describe(*args, **kwargs))
        return original(*args, **kwargs)

    return guarded


def _install() -> None:
    """Wrap, once per process, the calls a download goes through; they act as before outside the block."""
    if _originals:
        return
    from helm.common import general

    _originals.update(
        connect=socket.socket.connect,
        create_connection=socket.create_connection,
        getaddrinfo=socket.getaddrinfo,
        shell=general.shell,
    )
    socket.socket.connect = _guard("connect", lambda self, address, *_: f"a connection to {address}")
    socket.create_connection = _guard("create_connection", lambda address, *_, **__: f"a connection to {address}")
    socket.getaddrinfo = _guard("getaddrinfo", lambda host, *_, **__: f"a look-up of host {host}")
    general.shell = _guard("shell", lambda args, *_, **__: f"the command `{' '.join(map(str, args))}`")


@contextmanager
def network_blocked() -> Iterator[None]:
    """In this thread, for the duration of the block: any network connection, host look-up or download command
    raises `NetworkBlocked`."""
    with _lock:
        _install()
    ident = threading.get_ident()
    _blocked.add(ident)
    try:
        yield
    finally:
        _blocked.discard(ident)
