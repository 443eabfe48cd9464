"""Where the service may send a webhook (the SSRF guard): hosts on an allowlist, addresses checked
after DNS resolution, and the request pinned to the address that was checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
# cloud metadata services: never a webhook receiver, whatever the allowlist says
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
RESOLVE_TIMEOUT_S = 2.0
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedURL(ValueError):
    """A webhook URL the service will not call; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL: send to `address` (the one that was checked), with `host` as the Host
    header and TLS server name."""

    url: str
    host: str
    port: int
    address: str

    def pinned_url(self) -> str:
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{literal}:{self.port}").geturl()


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    """`host` is an entry of `allowlist` (case-insensitive), or under a `*.domain` entry, or the
    allowlist holds `*`."""
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowlist):
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
    return False


def address_refusal(address: Address, allowlist: tuple[str, ...]) -> str | None:
    """Why `address` may not be called (None: it may). Loopback, private, link-local, reserved
    and multicast addresses only when the allowlist names the address itself."""
    if address in METADATA:
        return f"{address} is a cloud metadata address"
    if address.is_global and not address.is_multicast:
        return None
    if str(address) in {e.strip("[]").lower() for e in allowlist}:
        return None
    return f"{address} is not a public address (name it in the allowlist to allow it)"


async def check_url(url: str, allowlist: tuple[str, ...]) -> Target:
    """The Target of `url`, after the allowlist and every address it resolves to are checked;
    RefusedURL otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise RefusedURL("a webhook URL must be http(s)://host[:port]/...")
    if parts.username or parts.password:
        raise RefusedURL("a webhook URL may not carry credentials")
    host = parts.hostname
    if not host_allowed(host, allowlist):
        raise RefusedURL(f"host {host!r} is not in the webhook allowlist")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise RefusedURL(f"host {host!r} does not resolve") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if (refusal := address_refusal(address, allowlist)) is not None:
            raise RefusedURL(f"host {host!r} resolves to {refusal}")
    return Target(url, host, port, str(addresses[0]))
