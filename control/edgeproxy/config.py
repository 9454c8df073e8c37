"""The daemon's own configuration (not cluster state): who am I, where do I read
state from, which interfaces carry traffic."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .proxy.server import ProxySettings

ROLES = ("edge", "worker", "both")
_FIELDS = {
    "instance", "role", "host_id", "state", "interfaces", "metrics", "ready_file",
    "refuse", "idle_timeout_s", "resync_interval_s", "attach", "http",
}


def default_processes() -> int:
    """HTTP processes when the config names none: one per CPU."""
    return os.cpu_count() or 1


def default_http() -> ProxySettings:
    return ProxySettings(processes=default_processes())


class ConfigError(ValueError):
    """A daemon config that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    instance: str
    role: str
    host_id: str
    state: Mapping[str, Any]
    interfaces: tuple[str, ...] = ()
    metrics_listen: str = "127.0.0.1:9109"
    ready_file: Path | None = None
    refuse: str = "rst"  # "rst" | "drop": what a full service does to a new connection
    idle_timeout_s: float = 300.0
    resync_interval_s: float = 1.0
    attach: Literal["xdp", "tc"] | None = None  # fast-path hook; None = the loader's default
    http: ProxySettings = field(default_factory=default_http)  # the `http:` section

    @property
    def is_edge(self) -> bool:
        return self.role in ("edge", "both")

    @property
    def is_worker(self) -> bool:
        return self.role in ("worker", "both")


def _require(data: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in data:
        raise ConfigError(f"{name}: required")
    value = data[name]
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_http(data: object) -> ProxySettings:
    """The `http:` section: any ProxySettings field, by name, with its type.
    ``processes`` defaults to one per CPU (ProxySettings' own default is 1)."""
    if data is None:
        return default_http()
    if not isinstance(data, Mapping):
        raise ConfigError("http: expected a mapping")
    defaults = ProxySettings()
    fields = {f.name for f in dataclasses.fields(ProxySettings)}
    values: dict[str, Any] = {"processes": default_processes()}  # one per CPU
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(f"http.{name}: unknown field")
        kind = type(getattr(defaults, name))
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool) or value < 0:
            raise ConfigError(f"http.{name}: expected a non-negative {kind.__name__}")
        values[name] = kind(value)
    try:
        return ProxySettings(**values)
    except ValueError as exc:
        raise ConfigError(f"http: {exc}") from exc


def parse_config(data: object) -> DaemonConfig:
    if not isinstance(data, Mapping):
        raise ConfigError("config: expected a mapping at the top level")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field")
    role = _require(data, "role", str)
    if role not in ROLES:
        raise ConfigError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    refuse = data.get("refuse", "rst")
    if refuse not in ("rst", "drop"):
        raise ConfigError(f"refuse: {refuse!r} is not rst or drop")
    interfaces = data.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
        raise ConfigError("interfaces: expected a list of interface names")
    attach = data.get("attach")
    if attach not in (None, "xdp", "tc"):
        raise ConfigError(f"attach: {attach!r} is not xdp or tc")
    metrics = data.get("metrics", {}) or {}
    ready = data.get("ready_file")
    return DaemonConfig(
        instance=_require(data, "instance", str),
        role=role,
        host_id=_require(data, "host_id", str),
        state=_require(data, "state", Mapping),
        interfaces=tuple(interfaces),
        metrics_listen=str(metrics.get("listen", "127.0.0.1:9109")),
        ready_file=Path(ready) if ready else None,
        refuse=refuse,
        idle_timeout_s=float(data.get("idle_timeout_s", 300.0)),
        resync_interval_s=float(data.get("resync_interval_s", 1.0)),
        attach=attach,
        http=parse_http(data.get("http")),
    )


def load_config(path: Path) -> DaemonConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(data)
