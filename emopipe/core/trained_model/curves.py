"""The learning curve of a run: loss and metric per epoch, the best epoch marked."""

from __future__ import annotations

from pathlib import Path

from emopipe.atomic import atomic_write


def learning_curve_png(history: list[dict], metric: str, path: Path, *, best_epoch: int | None = None,
                       title: str = "") -> Path:
    """Loss and metric per epoch (train and val), best epoch marked; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "metric"), ("loss", metric)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
