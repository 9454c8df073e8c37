"""Results -> a text table (terminal) and docs/BENCHMARKS.md + docs/bench/*.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgebench.common import REPO, RESULTS_DIR

PAGE = REPO / "docs" / "BENCHMARKS.md"
PLOTS = REPO / "docs" / "bench"
ORDER = ("xdp", "tcp", "http", "h1core", "scale", "scrape")
TITLES = {
    "xdp": "Fast path: per-packet cost (BPF_PROG_TEST_RUN)",
    "tcp": "Raw TCP through the edge (own namespaces: client → edge → worker)",
    "http": "HTTP through the edge",
    "h1core": "The compiled HTTP/1 core beside its Python twins",
    "scale": "Control plane at 200,000 apps",
    "scrape": "/metrics scrape",
}


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _row_cells(r: dict[str, Any]) -> list[str]:
    s = r["summary"]
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x {r['peer']}"
    if r["met"] is None:
        target = r["target"] or ""
    else:
        target = f"{r['target']}: {'met' if r['met'] else '**missed**'}"
    return [r["name"], r["metric"], f"{fmt(s['median'])} {r['unit']}",
            f"{fmt(s['min'])}-{fmt(s['max'])}", str(s["n"]), ratio, target]


HEAD = ["case", "metric", "median", "min-max", "runs", "ratio (medians)", "target"]


def text_table(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"  {result['scenario']}: not measured: {result['skipped']}"
    rows = [HEAD] + [_row_cells(r) for r in result["rows"]]
    widths = [max(len(c[i].replace("**", "")) for c in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.replace("**", "").ljust(w) for c, w in zip(row, widths, strict=True))
             for row in rows]
    return "\n".join(lines)


def md_table(result: dict[str, Any]) -> str:
    rows = [_row_cells(r) for r in result["rows"]]
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(c) + " |" for c in rows]
    return "\n".join(out)


def load_all(directory: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    found = {}
    for name in ORDER:
        path = directory / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def write_page(directory: Path = RESULTS_DIR, page: Path = PAGE) -> Path:
    from edgebench import plots, prose

    results = load_all(directory)
    images = plots.draw(results, PLOTS)
    parts = [prose.header(results)]
    for name in ORDER:
        res = results.get(name)
        parts.append(f"## {TITLES[name]}\n")
        if res is None:
            parts.append("Not run yet (`tools/bench " + name + "`).\n")
            continue
        m = res["machine"]
        parts.append(f"Measured {res['started']} with `{res['command']}` "
                     f"({res['runs']} runs{', quick' if res['quick'] else ''}; "
                     f"{res['duration_s']:.0f} s; load average "
                     f"{m['loadavg_at_start'][0]} at start, "
                     f"{(res.get('loadavg_at_end') or ['?'])[0]} at end).\n")
        if res.get("skipped"):
            parts.append(f"**Not measured:** {res['skipped']}\n")
        else:
            parts.append(prose.method(name) + "\n")
            parts.append(md_table(res) + "\n")
        for img in images.get(name, []):
            parts.append(f"![{img.stem}](bench/{img.name})\n")
        if res.get("notes"):
            parts.append("\n".join(f"- {n}" for n in res["notes"]) + "\n")
        verdict = prose.verdict(name, res)
        if verdict:
            parts.append(verdict + "\n")
    page.write_text("\n".join(parts))
    return page
