"""The lab's addressing plan (docs/DESIGN.md, "The lab") as data.

Which hosts exist, their roles, regions and host addresses come from the state
file, so the state file is the one truth about the cluster; everything the lab
adds around it (the client, links, delays, routes) is decided here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

from edgelab.statefile import LabState

NAMESPACE_PREFIX = "ep-"
CLIENT = "client"
# The client sits next to ord: its delay to an edge is ord's delay to that edge.
CLIENT_REGION = "ord"
# 198.18.0.2 reaches apps via the nearest edge, 198.18.0.3 via the next, ...
CLIENT_FIRST_ADDRESS = ipaddress.IPv4Address("198.18.0.2")
LINK_POOL = ipaddress.IPv4Network("198.18.1.0/24")
VIP_RANGE = ipaddress.IPv4Network("198.19.0.0/16")
# IPv6 mirrors the plan on the client side only (HTTP apps; the backhaul is IPv4):
# fd00::2 via the nearest edge, fd00::3 via the next, ...; client-edge link N is
# fd00:1:N::/64; HTTP apps' IPv6 twins come from fd00:19::/48.
CLIENT_FIRST_ADDRESS6 = ipaddress.IPv6Address("fd00::2")
LINK_POOL6 = ipaddress.IPv6Network("fd00:1::/32")
LINK_PREFIXLEN6 = 64
VIP_RANGE6 = ipaddress.IPv6Network("fd00:19::/48")
CLIENT_LINK_MTU = 1500
# An encapsulated full-size client packet must fit the backhaul unfragmented.
BACKHAUL_MTU = 1600
# Client source-policy tables for the second, third, ... edge (the first uses main).
CLIENT_TABLE_BASE = 100
IFNAME_MAX = 15

# One-way delay between regions in milliseconds (issue 2 item 4). Same region is 0.
ONE_WAY_DELAY_MS: dict[frozenset[str], int] = {
    frozenset({"ord", "ams"}): 45,
    frozenset({"ord", "syd"}): 95,
    frozenset({"ams", "syd"}): 140,
}


class TopologyError(ValueError):
    """The state file's hosts cannot be laid out as a lab; the message says why."""


def one_way_delay_ms(region_a: str, region_b: str) -> int:
    if region_a == region_b:
        return 0
    try:
        return ONE_WAY_DELAY_MS[frozenset({region_a, region_b})]
    except KeyError:
        raise TopologyError(
            f"no lab delay for regions {region_a}-{region_b}; add it to ONE_WAY_DELAY_MS"
        ) from None


def namespace_of(node: str) -> str:
    return NAMESPACE_PREFIX + node


def ifname_toward(peer: str) -> str:
    """A node's interface toward `peer` is named after the peer: `to-worker-syd`."""
    name = "to-" + peer
    if len(name) > IFNAME_MAX:
        raise TopologyError(f"node name {peer!r} too long for an interface name ({name})")
    return name


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point veth between two nodes with a /30 (and, client-edge, a /64)
    and a one-way delay. In either family the first node takes ::1/.1, the second ::2/.2."""

    index: int
    a: str
    b: str
    subnet: ipaddress.IPv4Network
    delay_ms: int
    mtu: int
    subnet6: ipaddress.IPv6Network | None = None

    def end(self, node: str) -> LinkEnd:
        if node == self.a:
            own, peer, peer_node = 1, 2, self.b
        elif node == self.b:
            own, peer, peer_node = 2, 1, self.a
        else:
            raise KeyError(f"{node} is not on link {self.a}-{self.b}")
        v4 = self.subnet.network_address
        end = LinkEnd(node, ifname_toward(peer_node), v4 + own, peer_node, v4 + peer)
        if self.subnet6 is None:
            return end
        v6 = self.subnet6.network_address
        return dataclasses.replace(end, address6=v6 + own, peer_address6=v6 + peer)


@dataclass(frozen=True, slots=True)
class LinkEnd:
    node: str
    ifname: str
    address: ipaddress.IPv4Address
    peer: str
    peer_address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address | None = None
    peer_address6: ipaddress.IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class Route:
    destination: str  # prefix, e.g. "198.18.64.0/24"
    via: str
    dev: str
    src: str
    table: int | None = None  # None = main


@dataclass(frozen=True, slots=True)
class Rule:
    """Source policy routing: traffic from `source` looks up `table`."""

    source: str
    table: int


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    role: str  # client | edge | worker
    region: str
    host_addresses: tuple[str, ...]
    # Extra addresses on lo: on edges, the HTTP apps' shared addresses (both families).
    local_app_addresses: tuple[str, ...] = ()
    machine_subnets: tuple[str, ...] = ()
    # IPv6 host addresses, index for index with host_addresses (the client only).
    host_addresses6: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        return namespace_of(self.name)

    @property
    def forwards(self) -> bool:
        return self.role != "client"


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    routes: dict[str, tuple[Route, ...]] = field(default_factory=dict)
    rules: dict[str, tuple[Rule, ...]] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def links_of(self, node: str) -> tuple[Link, ...]:
        return tuple(link for link in self.links if node in (link.a, link.b))

    def interfaces_of(self, node: str) -> tuple[str, ...]:
        return tuple(link.end(node).ifname for link in self.links_of(node))

    def link_between(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"no link {a}-{b}")

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(node.namespace for node in self.nodes)


def _http_app_addresses(state: LabState) -> tuple[str, ...]:
    addresses: list[str] = []
    for app in state.apps:
        if any(s.is_http for s in state.services_of(app.name)):
            addresses.extend(a for a in app.addresses if a not in addresses)
    return tuple(addresses)


def _machine_subnets(state: LabState, host: str) -> tuple[str, ...]:
    subnets: list[str] = []
    for machine in state.machines:
        if machine.host == host:
            subnet = str(ipaddress.IPv4Network(f"{machine.address}/24", strict=False))
            if subnet not in subnets:
                subnets.append(subnet)
    return tuple(subnets)


def _edges_nearest_first(state: LabState) -> list[str]:
    edges = [h for h in state.hosts if h.role in ("edge", "both")]
    edges.sort(key=lambda h: one_way_delay_ms(CLIENT_REGION, h.region))
    return [h.id for h in edges]


def _nodes(state: LabState, edges: list[str]) -> tuple[Node, ...]:
    client_addresses = tuple(str(CLIENT_FIRST_ADDRESS + i) for i in range(len(edges)))
    client_addresses6 = tuple(str(CLIENT_FIRST_ADDRESS6 + i) for i in range(len(edges)))
    nodes = [Node(CLIENT, "client", CLIENT_REGION, client_addresses,
                  host_addresses6=client_addresses6)]
    shared = _http_app_addresses(state)
    for edge in edges:
        host = state.host(edge)
        nodes.append(Node(host.id, "edge", host.region, (host.address,), shared))
    for host in state.hosts:
        if host.role == "worker":
            subnets = _machine_subnets(state, host.id)
            nodes.append(Node(host.id, "worker", host.region, (host.address,), (), subnets))
    return tuple(nodes)


def _links(nodes: tuple[Node, ...]) -> tuple[Link, ...]:
    edges = [n for n in nodes if n.role == "edge"]
    workers = [n for n in nodes if n.role == "worker"]
    client = nodes[0]
    pairs = [(client, e, CLIENT_LINK_MTU) for e in edges]
    pairs += [(e, w, BACKHAUL_MTU) for e in edges for w in workers]
    subnets = LINK_POOL.subnets(new_prefix=30)
    links = []
    for index, (a, b, mtu) in enumerate(pairs):
        try:
            subnet = next(subnets)
        except StopIteration:
            raise TopologyError(f"more links than /30s in {LINK_POOL}") from None
        subnet6 = _link_subnet6(index) if a is client else None
        links.append(Link(index, a.name, b.name, subnet, one_way_delay_ms(a.region, b.region),
                          mtu, subnet6))
    return tuple(links)


def _link_subnet6(index: int) -> ipaddress.IPv6Network:
    """Link N's /64 is fd00:1:N::/64 (N in the third group, readable in `ip addr`)."""
    if index >= 1 << 16:
        raise TopologyError(f"more links than third groups in {LINK_POOL6}")
    # N fills the 16 bits right after the pool's /32.
    start = LINK_POOL6.network_address + (index << (128 - LINK_POOL6.prefixlen - 16))
    return ipaddress.IPv6Network((start, LINK_PREFIXLEN6))


def _client_routes(
    nodes: tuple[Node, ...], topo_links: tuple[Link, ...]
) -> tuple[tuple[Route, ...], tuple[Rule, ...]]:
    """Each client address reaches every lab destination through its own edge; each
    client IPv6 address reaches the IPv6 app addresses (the only IPv6 destinations)
    through the same edge, with the same table."""
    client = nodes[0]
    edges = [n for n in nodes if n.role == "edge"]
    workers = [n for n in nodes if n.role == "worker"]
    everywhere = [str(VIP_RANGE)]
    everywhere += [s for w in workers for s in w.machine_subnets]
    everywhere += [f"{w.host_addresses[0]}/32" for w in workers]
    routes: list[Route] = []
    rules: list[Rule] = []
    for i, (edge, source, source6) in enumerate(
        zip(edges, client.host_addresses, client.host_addresses6, strict=True)
    ):
        end = next(lk for lk in topo_links if {lk.a, lk.b} == {client.name, edge.name}).end(
            client.name
        )
        table = None if i == 0 else CLIENT_TABLE_BASE + i
        if table is not None:
            rules.append(Rule(source, table))
        via, dev = str(end.peer_address), end.ifname
        routes.extend(Route(dst, via, dev, source, table) for dst in everywhere)
        # Each edge's own address is always reached over its own link.
        routes.append(Route(f"{edge.host_addresses[0]}/32", via, dev, source, None))
        if table is not None:
            routes.append(Route(f"{edge.host_addresses[0]}/32", via, dev, source, table))
        if end.peer_address6 is not None:
            if table is not None:
                rules.append(Rule(source6, table))
            routes.append(Route(str(VIP_RANGE6), str(end.peer_address6), dev, source6, table))
    return tuple(routes), tuple(rules)


def _edge_routes(node: Node, nodes: tuple[Node, ...], topo: Topology) -> tuple[Route, ...]:
    client = nodes[0]
    own = node.host_addresses[0]
    to_client = topo.link_between(node.name, client.name).end(node.name)
    routes = [
        Route(f"{a}/32", str(to_client.peer_address), to_client.ifname, own)
        for a in client.host_addresses
    ]
    if to_client.address6 is not None and to_client.peer_address6 is not None:
        # The edge has no IPv6 host address: its end of the client link is the source.
        routes.extend(
            Route(f"{a}/128", str(to_client.peer_address6), to_client.ifname,
                  str(to_client.address6))
            for a in client.host_addresses6
        )
    for worker in (n for n in nodes if n.role == "worker"):
        end = topo.link_between(node.name, worker.name).end(node.name)
        dsts = [f"{worker.host_addresses[0]}/32", *worker.machine_subnets]
        routes.extend(Route(d, str(end.peer_address), end.ifname, own) for d in dsts)
    return tuple(routes)


def _worker_routes(node: Node, nodes: tuple[Node, ...], topo: Topology) -> tuple[Route, ...]:
    """Replies go back through the edge the client address uses, so paths are symmetric."""
    client = nodes[0]
    own = node.host_addresses[0]
    edges = [n for n in nodes if n.role == "edge"]
    routes: list[Route] = []
    for edge, client_address in zip(edges, client.host_addresses, strict=True):
        end = topo.link_between(node.name, edge.name).end(node.name)
        for dst in (f"{edge.host_addresses[0]}/32", f"{client_address}/32"):
            routes.append(Route(dst, str(end.peer_address), end.ifname, own))
    return tuple(routes)


def build_topology(state: LabState) -> Topology:
    edges = _edges_nearest_first(state)
    if not edges:
        raise TopologyError("the state file has no host with role edge")
    nodes = _nodes(state, edges)
    topo = Topology(nodes, _links(nodes))
    client_routes, client_rules = _client_routes(nodes, topo.links)
    topo.routes[CLIENT] = client_routes
    topo.rules[CLIENT] = client_rules
    for node in nodes:
        if node.role == "edge":
            topo.routes[node.name] = _edge_routes(node, nodes, topo)
        elif node.role == "worker":
            topo.routes[node.name] = _worker_routes(node, nodes, topo)
    for node in nodes:
        ifname_toward(node.name)  # fail early on names that do not fit an interface
    return topo
