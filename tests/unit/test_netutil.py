"""atropos_verl.netutil: the URL a client uses for a server bound to a given host."""

import pytest

from atropos_verl.netutil import http_url


@pytest.mark.parametrize(
    "bind_host, url",
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("10.1.2.3", "http://10.1.2.3:8000"),
        ("fe80::1", "http://[fe80::1]:8000"),
    ],
)
def test_wildcard_binds_are_reached_on_loopback_and_ipv6_is_bracketed(bind_host, url):
    assert http_url(bind_host, 8000) == url
