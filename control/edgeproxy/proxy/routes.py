"""Host → app → service table, rebuilt whole on every update and swapped atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from edgeproxy.routing import Backend, ServiceTable

HTTP_HANDLER = "http"


def normalize_host(host: bytes | str | None) -> str | None:
    """``Web.Lab:8080`` → ``web.lab``; ``[::1]:80`` → ``::1``; junk → None."""
    if host is None:
        return None
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else None
    name, _, _port = text.partition(":")
    return name.rstrip(".") or None


@dataclass(frozen=True, slots=True)
class RouteMap:
    by_app_port: Mapping[tuple[str, int], ServiceTable]
    by_address_port: Mapping[tuple[str, int], ServiceTable]
    hostnames: Mapping[str, str]  # normalized host -> app
    # Every machine of every HTTP service, by (address, port): what a worker may deliver to.
    machines_by_target: Mapping[tuple[str, int], Backend]
    listen: frozenset[tuple[str, int]]

    def resolve(
        self, host: bytes | str | None, local_address: str, local_port: int
    ) -> ServiceTable | None:
        """The service a request belongs to: by Host if it names an app, else by the
        address it arrived on (an app with a dedicated address)."""
        name = normalize_host(host)
        app = self.hostnames.get(name) if name is not None else None
        if app is not None:
            return self.by_app_port.get((app, local_port))
        by_address = self.by_address_port.get((local_address, local_port))
        if by_address is not None:
            return by_address
        if name is not None:
            return self.by_address_port.get((name, local_port))
        return None


EMPTY_ROUTES = RouteMap({}, {}, {}, {}, frozenset())


def _is_shared(tables: Sequence[ServiceTable], address: IPv4Address, port: int) -> bool:
    owners = {t.app for t in tables if address in t.addresses and port in t.ports}
    return len(owners) > 1


def build_routes(tables: Sequence[ServiceTable], hostnames: Mapping[str, str]) -> RouteMap:
    http = [t for t in tables if HTTP_HANDLER in t.handlers]
    by_app_port: dict[tuple[str, int], ServiceTable] = {}
    by_address_port: dict[tuple[str, int], ServiceTable] = {}
    machines: dict[tuple[str, int], Backend] = {}
    listen: set[tuple[str, int]] = set()
    for table in http:
        for port in table.ports:
            by_app_port.setdefault((table.app, port), table)
            for address in table.addresses:
                listen.add((str(address), port))
                # A shared address is routed by Host only; a dedicated one also by address.
                if not _is_shared(http, address, port):
                    by_address_port[(str(address), port)] = table
        for tier in table.tiers:
            for backend in tier:
                machines[(str(backend.address), backend.port)] = backend
    names = {}
    for host, app in hostnames.items():
        name = normalize_host(host)
        if name is not None:
            names[name] = app
    return RouteMap(by_app_port, by_address_port, names, machines, frozenset(listen))


def is_ip_literal(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
