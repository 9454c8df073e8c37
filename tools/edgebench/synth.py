"""A synthetic cluster state as plain data (what YAML/SQLite/etcd would load):
``apps`` apps with one raw-TCP service each, ``machines_per_app`` machines each on
workers in distinct regions, ``regions`` regions with one edge and a few workers.

Addresses are data only: they are never configured on an interface nor sent on
any wire (10.0.0.0/8 for hosts and machines, 100.64.0.0/10 for app VIPs, because
600,000 machines do not fit in 198.18.0.0/15).
"""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address
from typing import Any

WORKERS_PER_REGION = 4
EDGE_ID = "edge-r00"


def build(apps: int = 200_000, machines_per_app: int = 3, regions: int = 30) -> dict[str, Any]:
    codes = [f"r{i:02d}" for i in range(regions)]
    data: dict[str, Any] = {
        "version": 1,
        "regions": [{"code": c, "position": [-60 + (i * 120 / regions), -170 + i * 11.0]}
                    for i, c in enumerate(codes)],
        "hosts": [],
        "apps": [],
        "services": [],
        "machines": [],
    }
    host_base = int(IPv4Address("10.255.0.0"))
    for i, c in enumerate(codes):
        data["hosts"].append({"id": f"edge-{c}", "role": "edge", "region": c,
                              "address": str(IPv4Address(host_base + i * 16))})
        for w in range(WORKERS_PER_REGION):
            data["hosts"].append({"id": f"w-{c}-{w}", "role": "worker", "region": c,
                                  "address": str(IPv4Address(host_base + i * 16 + 1 + w))})
    vip_base = int(IPv4Address("100.64.0.0"))
    m_base = int(IPv4Address("10.0.0.0"))
    m = 0
    for a in range(apps):
        name = f"app{a:06d}"
        data["apps"].append({"name": name, "addresses": [str(IPv4Address(vip_base + a))]})
        data["services"].append({
            "id": f"{name}-tcp", "app": name, "protocol": "tcp", "ports": [7000],
            "internal_port": 7000, "handlers": [],
            "concurrency": {"type": "connections", "soft_limit": 50, "hard_limit": 100},
        })
        for k in range(machines_per_app):
            region = codes[(a + k * 7) % regions]
            data["machines"].append({
                "id": f"{name}-m{k}", "app": name,
                "host": f"w-{region}-{(a + k) % WORKERS_PER_REGION}",
                "address": str(IPv4Address(m_base + m)), "state": "started",
            })
            m += 1
    return data


_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*\Z")
_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _WORDS:
        return text
    return json.dumps(text)  # a JSON string is a double-quoted YAML scalar


def _emit(value: Any, indent: str, out: list[str]) -> None:
    """Block style, as yaml.dump writes it (sequences not indented under their key)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{indent}{key}:\n")
                _emit(item, indent if isinstance(item, list) else indent + "  ", out)
            else:
                out.append(f"{indent}{key}: {_flow(item)}\n")
    else:
        for item in value:
            if isinstance(item, dict) and item:
                first = len(out)
                _emit(item, indent + "  ", out)
                out[first] = f"{indent}- " + out[first][len(indent) + 2 :]
            else:
                out.append(f"{indent}- {_flow(item)}\n")


def _flow(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return _scalar(value)


def yaml_text(data: dict[str, Any]) -> str:
    """``data`` as a block-style YAML file, in seconds rather than the minute
    ``yaml.dump`` takes for 200,000 apps; ``yaml.safe_load`` gives ``data`` back."""
    out: list[str] = []
    _emit(data, "", out)
    return "".join(out)
