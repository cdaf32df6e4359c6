"""PNG figures for people (curves, overlays): headless backend, written atomically."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int | None = None) -> Path:
    """Write `fig` to `path` via a temporary file, then close it."""
    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path


def class_colors(n: int):
    """(n, 3) RGB floats in [0, 1], one distinct colour per class index; index 0 (background) black.

    tab20's 10 saturated colours, then its 10 light ones, then golden-ratio hues: neighbouring class indices
    (often left/right of one structure) get different hues."""
    import colorsys

    import numpy as np

    plt = pyplot()
    base = [plt.get_cmap("tab20")(i)[:3] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    extra = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.95) for i in range(max(0, n - 21))]
    colors = [(0.0, 0.0, 0.0)] + (base + extra)[: max(0, n - 1)]
    return np.asarray(colors, np.float32).reshape(n, 3)


def label_overlay(image, labels, colors, alpha: float = 0.5):
    """An H×W grey image (any range) with a class-index map blended in (background left as is): H×W×3 floats."""
    import numpy as np

    img = np.asarray(image, np.float32)
    lo, hi = float(img.min()), float(img.max())
    grey = (img - lo) / max(hi - lo, 1e-8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    fg = labels > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * np.asarray(colors)[labels[fg]]
    return np.clip(rgb, 0.0, 1.0)


def legend_handles(names, colors, indices):
    """Legend patches for the class `indices` (name and colour of each)."""
    from matplotlib.patches import Patch

    return [Patch(facecolor=tuple(colors[i]), edgecolor="none", label=f"{i} {names[i]}") for i in indices]
