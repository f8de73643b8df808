"""bench ddp's rendezvous address: one rank 0's peers can reach, without reverse DNS."""

import socket

from mpilm.bench.ddp import rendezvous_address


def _route_source(ip):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((ip, 9))
            return udp.getsockname()[0]
    except OSError:
        return None


def _own_name_fallback(me):
    try:
        addresses = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        addresses = []
    return next((a for a in addresses if not a.startswith("127.")), me)


def test_one_host_rendezvous_on_loopback():
    assert rendezvous_address("n0", []) == "127.0.0.1"
    assert rendezvous_address("n0", ["n0", "n0"]) == "127.0.0.1"


def test_other_hosts_get_the_address_of_the_interface_that_reaches_them():
    peer = "198.51.100.7"  # TEST-NET-2: routed (by a default route, if any) but never contacted
    source = _route_source(peer)
    expected = source if source and not source.startswith("127.") else _own_name_fallback("n0")
    assert rendezvous_address("n0", ["n0", peer]) == expected


def test_unreachable_or_loopback_peers_fall_back_to_this_hosts_name():
    expected = _own_name_fallback("n0")
    assert rendezvous_address("n0", ["no-such-node.invalid"]) == expected
    assert rendezvous_address("n0", ["localhost"]) == expected  # its route is loopback: useless to others
    assert not expected.startswith("127.")
