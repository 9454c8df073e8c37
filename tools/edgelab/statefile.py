"""The few facts the lab needs from a cluster state file.

The file is read and validated by `edgeproxy.state.load_state` (the one parser);
this module only narrows it to what the lab lays out: hosts, apps, services and
machines as plain strings and tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeproxy.state import ClusterState, StateError, load_state


class StateFileError(ValueError):
    """The state file lacks something the lab needs; the message names the place."""


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    role: str  # edge | worker | both
    region: str
    address: str


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    app: str
    ports: tuple[int, ...]
    internal_port: int
    handlers: tuple[str, ...]

    @property
    def is_http(self) -> bool:
        return "http" in self.handlers


@dataclass(frozen=True, slots=True)
class App:
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Machine:
    id: str
    app: str
    host: str
    address: str
    state: str


@dataclass(frozen=True, slots=True)
class LabState:
    path: Path
    regions: tuple[str, ...]
    hosts: tuple[Host, ...]
    apps: tuple[App, ...]
    services: tuple[Service, ...]
    machines: tuple[Machine, ...]

    def host(self, host_id: str) -> Host:
        for host in self.hosts:
            if host.id == host_id:
                return host
        raise StateFileError(f"hosts: no host {host_id!r}")

    def services_of(self, app: str) -> tuple[Service, ...]:
        return tuple(s for s in self.services if s.app == app)


def _lab_view(cluster: ClusterState, path: Path) -> LabState:
    return LabState(
        path=path.resolve(),
        regions=tuple(cluster.regions),
        hosts=tuple(
            Host(h.id, h.role, h.region, str(h.address)) for h in cluster.hosts.values()
        ),
        apps=tuple(
            App(a.name, tuple(str(x) for x in a.addresses)) for a in cluster.apps.values()
        ),
        services=tuple(
            Service(s.id, s.app, tuple(s.ports), s.internal_port, tuple(s.handlers))
            for s in cluster.services.values()
        ),
        machines=tuple(
            Machine(m.id, m.app, m.host, str(m.address), m.state)
            for m in cluster.machines.values()
        ),
    )


def load_lab_state(path: Path) -> LabState:
    """The lab's view of the state file at `path`, validated by `edgeproxy.state`."""
    try:
        cluster = load_state(path)
    except (OSError, StateError) as exc:
        raise StateFileError(str(exc)) from exc
    return _lab_view(cluster, path)
