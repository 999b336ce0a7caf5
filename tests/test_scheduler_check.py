"""``--scheduler ADDRESS`` is checked over distributed's own protocol before any Client exists:
a server that is not a Dask scheduler, nothing listening, or a tls:// address without TLS
settings is one line (a half-made Client used to hang 20 s and print a traceback), and a real
scheduler passes."""
import http.server
import socket
import threading
import time

import pytest

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.slide.distributed import check_scheduler


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the bad requests it is sent are the point, not news
        pass


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_web_server_is_not_a_scheduler(http_port):
    t = time.perf_counter()
    with pytest.raises(DataError, match="cannot connect to a Dask scheduler|not a Dask scheduler") as e:
        check_scheduler(f"tcp://127.0.0.1:{http_port}", timeout_s=2)
    assert "\n" not in str(e.value) and "out of memory" not in str(e.value)
    assert time.perf_counter() - t < 15


def test_nothing_listening_and_tls_without_settings_are_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=f"127.0.0.1:{port}"):
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout_s=1)
    with pytest.raises(DataError, match="TLS settings"):
        check_scheduler("tls://127.0.0.1:1", timeout_s=1)


def test_a_real_scheduler_passes():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        check_scheduler(cluster.scheduler_address, timeout_s=5)
