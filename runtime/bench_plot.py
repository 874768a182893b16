"""``edgefm bench --plot``: the results as a horizontal bar chart drawn with OpenCV (no plotting library)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .draw import write_image


def bench_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [(name, r) for name, r in result["components"].items()]
    return rows + [(f"{name} (pipeline)", r) for name, r in result["pipelines"].items()]


def _nice_step(span: float) -> float:
    raw = span / 5
    mag = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    return float(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def plot_bars(result: dict[str, Any], path: str | Path) -> Path:
    """Horizontal bar chart (OpenCV): bar = median, whisker = p90..p99, value written beside each bar."""
    rows = bench_rows(result)
    width, left, right, top, row_h = 1000, 250, 190, 78, 40
    height = top + row_h * len(rows) + 50
    img = np.full((height, width, 3), 255, np.uint8)
    font, dark, grid = cv2.FONT_HERSHEY_SIMPLEX, (30, 30, 30), (225, 225, 225)
    title = f"edgefm bench  {result['family']}/{result['variant']}  on {result['backend']}, batch {result['batch']}"
    cv2.putText(img, title, (16, 30), font, 0.65, dark, 1, cv2.LINE_AA)
    cv2.putText(img, f"latency in ms over {result['iters']} runs: bar = median, whisker = p90..p99", (16, 54),
                font, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
    vmax = max(r["latency_ms"]["p99"] for _, r in rows) * 1.05 or 1.0
    plot_w = width - left - right

    def x(v: float) -> int:
        return left + int(round(v / vmax * plot_w))

    step = _nice_step(vmax)
    y_axis = top + row_h * len(rows)
    for k in range(int(vmax / step) + 1):
        gx = x(k * step)
        cv2.line(img, (gx, top - 6), (gx, y_axis), grid, 1)
        cv2.putText(img, f"{k * step:g}", (gx - 8, y_axis + 20), font, 0.4, dark, 1, cv2.LINE_AA)
    for i, (name, r) in enumerate(rows):
        ms, y0 = r["latency_ms"], top + i * row_h
        color = (245, 130, 48) if r["kind"] == "pipeline" else (0, 110, 190)  # RGB
        cv2.putText(img, name, (16, y0 + 25), font, 0.5, dark, 1, cv2.LINE_AA)
        cv2.rectangle(img, (left, y0 + 8), (max(x(ms["median"]), left + 1), y0 + row_h - 8), color, -1)
        yc = y0 + row_h // 2
        cv2.line(img, (x(ms["p90"]), yc), (x(ms["p99"]), yc), dark, 2)
        cv2.line(img, (x(ms["p99"]), yc - 6), (x(ms["p99"]), yc + 6), dark, 2)
        cv2.putText(img, f"{ms['median']:.2f} ms (p99 {ms['p99']:.2f})", (x(ms["p99"]) + 8, yc + 5), font, 0.45,
                    dark, 1, cv2.LINE_AA)
    cv2.line(img, (left, top - 6), (left, y_axis), dark, 1)
    cv2.putText(img, "ms", (width - right + 10, y_axis + 20), font, 0.4, dark, 1, cv2.LINE_AA)
    return write_image(path, img)
