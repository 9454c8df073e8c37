"""edgectl output: every listing as a readable table or as JSON, from plain data.

Pure functions (no kernel, no clock): ``tests/test_cli.py`` pins their output with
golden files. Each view has a ``*_json`` (what ``-o json`` prints, stable keys) and
a ``*_table`` built from it, so both outputs always show the same facts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .dataplane import Flow
from .introspect import AppTcpTotals, MapInfo, ProgramInfo
from .state import ClusterState

Json = Any


def to_json(data: Json) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _numeric_column(values: Sequence[object]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in present)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [_numeric_column([r[i] for r in rows]) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)]) + "\n"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable: the loop returns at GiB


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def utc(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------- status


def programs_json(progs: Sequence[ProgramInfo]) -> list[Json]:
    return [{"name": p.name, "id": p.id, "tag": p.tag, "type": p.type,
             "loaded_at": utc(p.loaded_at),
             "attached": [{"device": a.device, "hook": a.hook, "mode": a.mode}
                          for a in p.attachments]} for p in progs]


def maps_json(maps: Sequence[MapInfo]) -> list[Json]:
    return [{"name": m.name, "type": m.type, "entries": m.entries,
             "max_entries": m.max_entries, "memory_bytes": m.memory_bytes,
             "key_size": m.key_size, "value_size": m.value_size} for m in maps]


def status_json(instance: str, role: str, pin_dir: str, host_address: str,
                progs: Sequence[ProgramInfo], maps: Sequence[MapInfo]) -> Json:
    return {"instance": instance, "role": role, "pin_dir": pin_dir,
            "host_address": host_address, "programs": programs_json(progs),
            "maps": maps_json(maps)}


def _attached(p: Json) -> str:
    return ", ".join(f"{a['device']} ({a['hook']} {a['mode']})" for a in p["attached"]) or \
        "-"


def programs_table(progs: Sequence[Json]) -> str:
    return table(["PROGRAM", "ID", "TAG", "TYPE", "LOADED", "ATTACHED"],
                 [[p["name"], p["id"], p["tag"], p["type"], p["loaded_at"], _attached(p)]
                  for p in progs])


def maps_table(maps: Sequence[Json]) -> str:
    rows = []
    for m in maps:
        fill = 100.0 * m["entries"] / m["max_entries"] if m["max_entries"] else 0.0
        rows.append([m["name"], m["type"], m["entries"], m["max_entries"], f"{fill:.1f}%",
                     human_bytes(m["memory_bytes"])])
    return table(["MAP", "TYPE", "USED", "MAX", "FILL", "MEMORY"], rows)


def status_table(status: Json) -> str:
    head = (f"instance {status['instance']} ({status['role']}), host address "
            f"{status['host_address']}, pinned at {status['pin_dir']}\n\n")
    progs = programs_table(status["programs"]) if status["programs"] else "no programs pinned\n"
    return head + progs + "\n" + maps_table(status["maps"])


# ------------------------------------------------------------------- dumps


def rows_table(rows: Sequence[Mapping[str, Json]]) -> str:
    """A table of dicts; columns in first-seen order, named in upper case."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return table([c.upper() for c in columns], [[r.get(c) for c in columns] for r in rows])


# ------------------------------------------------------------------- conns


def flows_json(flows: Sequence[Flow]) -> list[Json]:
    return [{"client": f"{f.client}:{f.client_port}", "vip": f"{f.vip}:{f.port}",
             "app": f.app, "service": f.service, "machine": f.machine, "state": f.state,
             "age_seconds": round(f.age, 3), "idle_seconds": round(f.idle, 3),
             "packets_in": f.packets_in, "bytes_in": f.bytes_in,
             "packets_out": f.packets_out, "bytes_out": f.bytes_out}
            for f in sorted(flows, key=lambda f: (f.app, f.machine, f.client, f.client_port))]


def flows_table(flows: Sequence[Json]) -> str:
    return table(["CLIENT", "VIP", "APP", "SERVICE", "MACHINE", "STATE", "AGE", "IDLE",
                  "BYTES IN", "BYTES OUT"],
                 [[f["client"], f["vip"], f["app"], f["service"], f["machine"], f["state"],
                   human_seconds(f["age_seconds"]), human_seconds(f["idle_seconds"]),
                   human_bytes(f["bytes_in"]), human_bytes(f["bytes_out"])] for f in flows])


# ------------------------------------------------------------------- stats

TCP_FIELDS = ("connects", "disconnects", "active", "refused", "bytes_in", "bytes_out",
              "packets_in", "packets_out")


def stats_json(instance: str, tcp: Mapping[str, AppTcpTotals],
               http: Mapping[str, Mapping[str, int]] | None) -> Json:
    """Per-app counters. ``http`` is None when the daemon's endpoint was not reachable."""
    apps = sorted(set(tcp) | set(http or {}))
    out = []
    for app in apps:
        totals = tcp.get(app)
        entry: dict[str, Json] = {"app": app}
        entry["tcp"] = ({f: getattr(totals, f) for f in TCP_FIELDS}
                        if totals is not None else None)
        if http is not None:
            entry["http_responses"] = dict(sorted((http.get(app) or {}).items()))
        out.append(entry)
    return {"instance": instance, "http_available": http is not None, "apps": out}


def _responses_cell(responses: Mapping[str, int] | None) -> str:
    if not responses:
        return "-"
    return " ".join(f"{status}:{count}" for status, count in sorted(responses.items()))


def stats_table(stats: Json) -> str:
    rows = []
    for a in stats["apps"]:
        tcp = a["tcp"] or {}
        rows.append([a["app"] or "(unknown host)", *(tcp.get(f) for f in TCP_FIELDS[:4]),
                     human_bytes(tcp.get("bytes_in")), human_bytes(tcp.get("bytes_out")),
                     _responses_cell(a.get("http_responses"))])
    text = table(["APP", "CONNECTS", "DISCONNECTS", "ACTIVE", "REFUSED", "BYTES IN",
                  "BYTES OUT", "HTTP RESPONSES"], rows)
    if not stats["http_available"]:
        text += "(HTTP counters live in the daemon; its metrics endpoint was not reachable)\n"
    return text


def rates_json(before: Json, after: Json, seconds: float) -> Json:
    """Per-second rates between two ``stats_json`` samples; gauges as they are now."""
    old = {a["app"]: a for a in before["apps"]}
    apps = []
    for a in after["apps"]:
        prev = old.get(a["app"], {})
        tcp, prev_tcp = a["tcp"] or {}, prev.get("tcp") or {}
        http = a.get("http_responses") or {}
        prev_http = prev.get("http_responses") or {}

        def rate(now: int, then: int) -> float:
            return round(max(0, now - then) / seconds, 3) if seconds > 0 else 0.0

        apps.append({
            "app": a["app"],
            "active": tcp.get("active", 0),
            "connects_per_s": rate(tcp.get("connects", 0), prev_tcp.get("connects", 0)),
            "refused_per_s": rate(tcp.get("refused", 0), prev_tcp.get("refused", 0)),
            "bytes_in_per_s": rate(tcp.get("bytes_in", 0), prev_tcp.get("bytes_in", 0)),
            "bytes_out_per_s": rate(tcp.get("bytes_out", 0), prev_tcp.get("bytes_out", 0)),
            "responses_per_s": rate(sum(http.values()), sum(prev_http.values())),
        })
    return {"instance": after["instance"], "interval_seconds": seconds, "apps": apps}


def rates_table(rates: Json) -> str:
    return table(["APP", "ACTIVE", "CONN/S", "REFUSED/S", "IN/S", "OUT/S", "RESP/S"],
                 [[a["app"] or "(unknown host)", a["active"], a["connects_per_s"],
                   a["refused_per_s"], human_bytes(int(a["bytes_in_per_s"])),
                   human_bytes(int(a["bytes_out_per_s"])), a["responses_per_s"]]
                  for a in rates["apps"]])


# ------------------------------------------------------------------- state


def state_summary_json(state: ClusterState, source: str) -> Json:
    return {
        "source": source, "version": state.version,
        "regions": sorted(state.regions),
        "hosts": [{"id": h.id, "role": h.role, "region": h.region, "address": str(h.address)}
                  for h in sorted(state.hosts.values(), key=lambda h: h.id)],
        "apps": [{"app": a.name,
                  "addresses": [str(x) for x in a.addresses],
                  "hostnames": list(a.hostnames),
                  "services": [s.id for s in state.services_by_app.get(a.name, ())],
                  "machines": len(state.machines_by_app.get(a.name, ()))}
                 for a in sorted(state.apps.values(), key=lambda a: a.name)],
    }


def state_summary_table(summary: Json) -> str:
    head = (f"{summary['source']}: version {summary['version']}, regions "
            f"{', '.join(summary['regions'])}\n\n")
    hosts = table(["HOST", "ROLE", "REGION", "ADDRESS"],
                  [[h["id"], h["role"], h["region"], h["address"]] for h in summary["hosts"]])
    apps = table(["APP", "ADDRESSES", "HOSTNAMES", "SERVICES", "MACHINES"],
                 [[a["app"], ",".join(a["addresses"]), ",".join(a["hostnames"]) or "-",
                   ",".join(a["services"]) or "-", a["machines"]] for a in summary["apps"]])
    return head + hosts + "\n" + apps
