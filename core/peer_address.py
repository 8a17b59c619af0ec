"""What a libp2p peer id and a multiaddr may look like here: the shapes hivemind makes, and
nothing else. Both the cluster file's [petals] initial_peers and what nodes report go through
these checks before they reach another node's command line."""

from __future__ import annotations

import ipaddress
import re

_BASE58 = "1-9A-HJ-NP-Za-km-z"  # base58btc: no 0, O, I, l
# hivemind's ids are the sha2-256 multihash of an RSA key (`Qm` + 44); libp2p's Ed25519 ids
# inline the key (`12D3KooW` + 44).
_PEER_ID_RE = re.compile(rf"Qm[{_BASE58}]{{44}}|12D3KooW[{_BASE58}]{{44}}")
_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                          r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


def valid_peer_id(text: str) -> bool:
    """A base58 libp2p peer id of the kinds hivemind uses, and nothing else."""
    return isinstance(text, str) and _PEER_ID_RE.fullmatch(text) is not None


def _valid_host(proto: str, value: str) -> bool:
    try:
        if proto == "ip4":
            return ipaddress.IPv4Address(value).version == 4
        if proto == "ip6":
            return "%" not in value and ipaddress.IPv6Address(value).version == 6
    except ValueError:
        return False
    return proto in ("dns", "dns4", "dns6") and _HOSTNAME_RE.fullmatch(value) is not None


def valid_multiaddr(text: str) -> bool:
    """`/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<peer id>`, each part checked."""
    if not isinstance(text, str) or not text.isascii():
        return False
    parts = text.split("/")
    if len(parts) != 7 or parts[0] or parts[3] != "tcp" or parts[5] != "p2p":
        return False
    _, proto, host, _, port, _, peer = parts
    return (_valid_host(proto, host) and _PORT_RE.fullmatch(port) is not None
            and int(port) <= 65535 and valid_peer_id(peer))
