"""PNG plots for the results page: bars of medians (min-max whiskers) per metric,
and latency CDFs where a scenario kept latency samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BAR_METRICS = {  # scenario -> metrics drawn as bars
    "xdp": ("cost",),
    "tcp": ("throughput", "conn-rate"),
    "http": ("req-rate", "transfer"),
}


def draw(results: dict[str, dict[str, Any]], outdir: Path) -> dict[str, list[Path]]:
    """Draw what the results allow; returns scenario -> image paths. Without
    matplotlib, draws nothing (the page then has tables only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    outdir.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[Path]] = {}
    for name, res in results.items():
        if res.get("skipped"):
            continue
        for metric in BAR_METRICS.get(name, ()):
            rows = [r for r in res["rows"] if r["metric"] == metric and r["name"] != "timer"]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
            labels = [r["name"] for r in rows]
            med = [r["summary"]["median"] for r in rows]
            lo = [r["summary"]["median"] - r["summary"]["min"] for r in rows]
            hi = [r["summary"]["max"] - r["summary"]["median"] for r in rows]
            colors = ["#d62728" if "edgeproxy" in lab or lab in (
                "established", "syn", "new-flows", "pass-through", "fast-path") else "#7f7f7f"
                for lab in labels]
            ax.barh(labels, med, xerr=[lo, hi], color=colors, capsize=3)
            ax.invert_yaxis()
            ax.set_xlabel(f"{metric} ({rows[0]['unit']}), median, whiskers min-max")
            ax.set_title(f"{name}: {metric}")
            fig.tight_layout()
            path = outdir / f"{name}-{metric}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            images.setdefault(name, []).append(path)
        cdfs = res.get("samples") or {}
        if cdfs:
            groups: dict[str, dict[str, list[float]]] = {}
            for key, values in cdfs.items():
                group, _, case = key.partition(":")
                groups.setdefault(group, {})[case] = values
            for group, series in groups.items():
                fig, ax = plt.subplots(figsize=(7, 4))
                for case, values in sorted(series.items()):
                    vs = sorted(values)
                    if not vs:
                        continue
                    ys = [(i + 1) / len(vs) for i in range(len(vs))]
                    ax.plot(vs, ys, label=case)
                ax.set_xscale("log")
                ax.set_xlabel(f"{group} (ms, log scale)")
                ax.set_ylabel("fraction ≤ x")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
                ax.set_title(f"{name}: {group} CDF")
                fig.tight_layout()
                path = outdir / f"{name}-{group.replace(' ', '-')}-cdf.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                images.setdefault(name, []).append(path)
    return images
