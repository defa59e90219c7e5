"""Figures written next to the tables (matplotlib, headless: nothing is shown, PNG files are written)."""
from __future__ import annotations

import os
from pathlib import Path

# DPO's logged quantities, each on its own panel: (log key, label); the loss comes first for every objective
DPO_PANELS = (("rewards/margins", "reward margin (chosen - rejected)"),
              ("rewards/accuracies", "reward accuracy (share of pairs with chosen > rejected)"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt
    return plt


def training_curves(history: list[dict], path: str | Path, title: str) -> Path:
    """Loss by optimizer step; for DPO (a history with reward metrics) also the reward margin (with
    the chosen and rejected rewards) and the reward accuracy. Written atomically to `path`."""
    plt = _pyplot()
    panels = [("loss", "training loss")] + [p for p in DPO_PANELS if any(p[0] in e for e in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(e["step"], e[key]) for e in history if key in e]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
        if key == "rewards/margins":
            for side in ("rewards/chosen", "rewards/rejected"):
                extra = [(e["step"], e[side]) for e in history if side in e]
                if extra:
                    ax.plot(*zip(*extra), linestyle="--", label=side)
            ax.axhline(0, color="grey", linewidth=0.7)
            ax.legend(fontsize=7)
        if key == "rewards/accuracies":
            ax.set_ylim(-0.05, 1.05)
            ax.axhline(0.5, color="grey", linewidth=0.7)
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    """PNG through a temporary file and a rename, so a crash never leaves half a figure."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
