import pathlib
import sys
import tempfile
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from dnsserver import TestDNSServer  # noqa: E402
from redisserver import RedisServer  # noqa: E402


@pytest.fixture
def short_tmp() -> Iterator[pathlib.Path]:
    """A temporary folder with a short path: ipc:// socket paths must stay under ~107 bytes."""
    with tempfile.TemporaryDirectory(prefix="sg-", dir="/tmp") as folder:
        yield pathlib.Path(folder)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on loopback, shared by the tests of one module."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def dns() -> Iterator[TestDNSServer]:
    """A DNS server on loopback that knows the destinations most tests send to."""
    with TestDNSServer() as server:
        server.add_mx("example.org", "mx.example.org", 10)
        server.add_a("mx.example.org", "127.0.0.1")
        server.add_mx("example.com", "mx.example.com", 10)
        server.add_a("mx.example.com", "127.0.0.1")
        server.add_a("a-only.test", "127.0.0.1")
        server.add_aaaa("aaaa-only.test", "::1")
        server.add_null_mx("null-mx.test")
        server.add_txt("no-mail.test", "v=spf1 -all")
        server.set_servfail("servfail.test")
        server.set_timeout("timeout.test")
        yield server
