"""Property-based checks of the Firecracker API against its v1.16.1 swagger with schemathesis:
generated requests for every operation (except /actions and /snapshot/*, which would start or
snapshot a VM) go to a live pre-boot server over a Unix socket; no answer may be a 5xx, every
answer must conform to the swagger, and none may hang.

The server is a small local harness (http.server on a Unix socket, one request at a time)
around FirecrackerApi.handle and a real, never started Machine, because the real front end
(embervm.fc.cli with embervm.fc.http) is being written at the same time; once it lands this
test should start ``python -m embervm.fc.cli --api-sock S`` instead.
"""

from __future__ import annotations

import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests_unixsocket = pytest.importorskip("requests_unixsocket")

from fc_swagger import validate_response  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from embervm.fc.api import FirecrackerApi  # noqa: E402
from embervm.machine import Machine  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "data" / "firecracker-v1.16.1.yaml"
MAX_EXAMPLES = 12


def _handler_class(api: FirecrackerApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            response = api.handle(self.command, self.path, body)
            self.send_response(response.status)
            for name, value in response.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body or b"")))
            self.end_headers()
            if response.body:
                self.wfile.write(response.body)

        def __getattr__(self, name: str):
            # every method (QUERY, TRACE, ...) reaches handle(), as in Firecracker's server;
            # HEAD is left out (its answer must have no body)
            if name.startswith("do_") and name != "do_HEAD":
                return self._serve
            raise AttributeError(name)

        def address_string(self) -> str:  # a Unix socket has no client address
            return "unix"

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


def _session(sock: Path):
    """A requests session whose ``http://fc-api`` URLs go to the Unix socket ``sock``
    (schemathesis joins its paths onto an http base URL, not onto ``http+unix://``)."""
    from urllib.parse import quote

    from requests_unixsocket.adapters import UnixAdapter

    target = "http+unix://" + quote(str(sock), safe="")

    class SocketAdapter(UnixAdapter):
        def get_connection(self, url, proxies=None):
            return super().get_connection(target, proxies)

    session = requests_unixsocket.Session()
    session.mount("http://fc-api/", SocketAdapter())
    return session


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    """A thread per connection: a client's idle keep-alive connection cannot block the next
    client (requests reach handle() one at a time all the same: the test is sequential)."""

    daemon_threads = True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sock = tmp_path_factory.mktemp("fcapi") / "api.sock"
    machine = Machine(id="schemathesis")
    api = FirecrackerApi(machine)
    srv = _UnixServer(str(sock), _handler_class(api))
    thread = threading.Thread(target=srv.serve_forever, name="fc-api-harness", daemon=True)
    thread.start()
    yield sock
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    machine.close()


schema = schemathesis.openapi.from_path(str(SPEC)).exclude(path_regex=r"^/(actions|snapshot)")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_swagger(case, server):
    from schemathesis import checks

    session = _session(server)
    base = "http://fc-api"
    # Firecracker answers an undeclared method with 400 (not 405): schemathesis's
    # unsupported_method check is left out on purpose.  Bodies are checked by fc_swagger, which
    # drops nulls first as Firecracker's own validator does (Firecracker answers e.g.
    # "cpu-config": null, which the swagger, having no nullable, would refuse), and a 204 has
    # no Content-Type, as Firecracker's has none.
    try:
        response = case.call_and_validate(
            base_url=base, session=session, timeout=10,
            checks=[checks.not_a_server_error, checks.status_code_conformance])
    finally:
        session.close()
    assert response.status_code < 500
    if response.status_code == 204:
        assert not response.content
        body = None
    else:
        assert response.headers.get("content-type") == ["application/json"], response.headers
        body = response.json()
    validate_response(case.method, case.formatted_path, response.status_code, body)
