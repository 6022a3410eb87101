"""A client's address: the peer, or X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress

from aiohttp import web


def _trusted(addr: str, proxies: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    for proxy in proxies:
        try:
            if ip in ipaddress.ip_network(proxy, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(request: web.Request, proxies: list[str]) -> str:
    """Walk X-Forwarded-For from the right while hops are trusted proxies.

    Only the part added by proxies we trust is believed; the rest a client can forge.
    """
    addr = request.remote or "unknown"
    if not proxies or not _trusted(addr, proxies):
        return addr
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        addr = hop
        if not _trusted(hop, proxies):
            break
    return addr
