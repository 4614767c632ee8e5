"""The admin CLI's client never hangs on a hung server, and retries only reads."""

import socket
import threading
import time

import httpx
import pytest

from server.cli import admin_client
from server.cli.admin_client import AdminClient, RemoteError


@pytest.fixture
def hung_server():
    """Accepts connections and never answers; counts them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def accept_forever():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for connection in accepted:
        connection.close()


def test_a_hung_server_fails_a_read_after_its_retries_and_a_change_at_once(hung_server, monkeypatch):
    url, accepted = hung_server
    monkeypatch.setattr(admin_client, "QUICK", httpx.Timeout(0.3, connect=0.3))
    client = AdminClient(url, None, "tester")
    started = time.monotonic()
    with pytest.raises(RemoteError, match="Cannot reach the baton server"):
        client.deployments()
    assert time.monotonic() - started < 5 and len(accepted) == admin_client.NUM_GET_ATTEMPTS
    with pytest.raises(RemoteError):
        client.swap("chat", "chat@2", "auto", "")
    assert len(accepted) == admin_client.NUM_GET_ATTEMPTS + 1  # a swap is never sent twice
