"""A PNG of held-out accuracy per iteration, one line per recipe, from a run's metrics.jsonl.

    plot_metrics("runs/demo/metrics.jsonl", "runs/demo/accuracy.png")
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .store import JsonlLog, atomic_write_bytes


def plot_metrics(metrics_path: str | Path, png_path: str | Path, keys=("test_pass@1",)) -> Path:
    """Draw `keys` against iteration for every recipe in the metrics file; returns the PNG's path."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = JsonlLog(metrics_path).read(need={"recipe": "string", "iteration": "index"})
    if not records:
        raise UserError(f"no metrics to plot in {metrics_path}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe in dict.fromkeys(r["recipe"] for r in records):
        rows = sorted((r for r in records if r["recipe"] == recipe and "iteration" in r), key=lambda r: r["iteration"])
        for key, style in zip(keys, ("-o", "--s", ":^")):
            points = [(r["iteration"], 100 * r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), style, label=f"{recipe} {key}" if len(keys) > 1 else recipe)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0 = starting model)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return Path(png_path)
