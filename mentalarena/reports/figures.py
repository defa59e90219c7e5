"""Figures written next to the tables (matplotlib, headless: nothing is shown, PNG files are written)."""
from __future__ import annotations

from pathlib import Path

from mentalarena.store.files import atomic_file

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
    try:
        with atomic_file(path) as f:  # mentalarena/store/files.py
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- score figures
# A panel of `score_bars` is a dict: "title", "ylabel", "groups" (the x positions, in order), "series"
# (each {"label", "values": {group: value}, "errors": {group: spread}, "published": bool}; a series
# draws a bar only where its value is not None, an error bar only where its spread is > 0),
# "baseline" ({group: value}: a dashed line across the group) and "baseline_label".
# A panel of `iteration_lines` is a dict: "title", "ylabel", "series" (each {"label", "points":
# [(iteration, value), ...], "mean": bool}); points whose value is None are left out.
PUBLISHED_HATCH = "///"


def score_bars(panels: list[dict], path: str | Path, title: str) -> Path:
    """Grouped bars, one panel per entry of `panels` (stacked), each group holding only the series
    that have a value there; published series hatched, the baseline a dashed line per group.
    Panels with nothing to draw are left out; with none left, the figure says so."""
    panels = [p for p in panels if _bar_values(p) or any(v is not None for v in p.get("baseline", {}).values())]
    widest = max((len(p["groups"]) * max(1, _most_bars(p)) for p in panels), default=1)
    fig, axes, colors = _stacked(panels, min(22.0, max(6.5, 0.32 * widest + 2.5)), 3.6)
    for ax, panel in zip(axes, panels):
        _bar_panel(ax, panel, colors)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def interval_dots(panels: list[dict], path: str | Path, title: str) -> Path:
    """Means with their interval as whiskers, one panel per entry of `panels` (stacked): x the
    groups, one colour per series, side by side within a group. A panel is {"title", "ylabel",
    "groups", "series": [{"label", "points": {group: (mean, low, high)}}], "reference": y or None (a
    grey line, e.g. 50 % for a win rate), "ylim": (low, high) or None}. Panels with no point are left out."""
    panels = [p for p in panels if any(s["points"] for s in p["series"])]
    widest = max((len(p["groups"]) for p in panels), default=1)
    fig, axes, colors = _stacked(panels, min(18.0, max(6.5, 0.9 * widest + 3.0)), 3.0)
    for ax, panel in zip(axes, panels):
        step = 0.7 / max(1, len(panel["series"]))
        for j, series in enumerate(panel["series"]):
            at = [(i, series["points"][g]) for i, g in enumerate(panel["groups"]) if g in series["points"]]
            if not at:
                continue
            xs = [i + (j - (len(panel["series"]) - 1) / 2) * step for i, _ in at]
            means = [m for _, (m, _, _) in at]
            spread = [[m - lo for _, (m, lo, _) in at], [hi - m for _, (m, _, hi) in at]]
            ax.errorbar(xs, means, yerr=spread, fmt="o", capsize=3, color=colors[series["label"]], label=series["label"])
        if panel.get("reference") is not None:
            ax.axhline(panel["reference"], color="grey", linewidth=0.8, linestyle="--")
        if panel.get("ylim"):  # a score's whole scale, so that a small difference looks small
            ax.set_ylim(*panel["ylim"])
        ax.set_xticks(range(len(panel["groups"])))
        ax.set_xticklabels(panel["groups"], fontsize=7, rotation=20 if len(panel["groups"]) > 5 else 0)
        ax.set_xlim(-0.6, len(panel["groups"]) - 0.4)
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def _stacked(panels: list[dict], width: float, height: float):
    """(figure, one axis per panel stacked, a colour per series label); no panel: one axis that says so."""
    plt = _pyplot()
    fig, axes = plt.subplots(max(1, len(panels)), 1, squeeze=False, figsize=(width, height * max(1, len(panels))))
    if not panels:
        _nothing(axes[0][0])
    return fig, list(axes[:, 0]), _colors([s["label"] for p in panels for s in p["series"]])


def iteration_lines(panels: list[dict], path: str | Path, title: str) -> Path:
    """One panel per entry of `panels` (side by side), x the iteration; means drawn thick.
    Panels with no point are left out; with none left, the figure says so."""
    plt = _pyplot()
    panels = [p for p in panels if any(y is not None for s in p["series"] for _, y in s["points"])]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.6), squeeze=False)
    if not panels:
        _nothing(axes[0][0])
    for ax, panel in zip(axes[0], panels):
        iterations = set()
        for series in panel["series"]:
            points = [(x, y) for x, y in series["points"] if y is not None]
            if not points:
                continue
            iterations.update(x for x, _ in points)
            ax.plot(*zip(*points), marker="o", label=series["label"],
                    linewidth=2.6 if series.get("mean") else 1.1, color="black" if series.get("mean") else None,
                    alpha=1.0 if series.get("mean") else 0.8)
        ax.set_xticks(sorted(iterations))
        if "%" in panel["ylabel"]:  # scores on their whole scale, so a small change looks small
            ax.set_ylim(0, max(100.0, *(y for s in panel["series"] for _, y in s["points"] if y is not None)) * 1.04)
        ax.set_xlabel("iteration (0: the starting model)")
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def _bar_values(panel: dict) -> list[tuple[str, dict]]:
    """(group, series) for every bar of the panel, in drawing order."""
    return [(g, s) for g in panel["groups"] for s in panel["series"] if s["values"].get(g) is not None]


def _most_bars(panel: dict) -> int:
    return max((sum(s["values"].get(g) is not None for s in panel["series"]) for g in panel["groups"]), default=0)


def _bar_panel(ax, panel: dict, colors: dict) -> None:
    width = 0.84 / max(1, _most_bars(panel))
    labelled, top = set(), 100.0
    for i, group in enumerate(panel["groups"]):
        present = [s for s in panel["series"] if s["values"].get(group) is not None]
        for j, series in enumerate(present):
            x, value = i + (j - (len(present) - 1) / 2) * width, series["values"][group]
            error = (series.get("errors") or {}).get(group)
            error = error if error else None  # None or 0: no error bar
            published = series.get("published", False)
            ax.bar(x, value, width * 0.92, yerr=error, capsize=2.5, color=colors[series["label"]],
                   alpha=0.45 if published else 0.9, hatch=PUBLISHED_HATCH if published else None,
                   edgecolor="black" if published else None, linewidth=0.4,
                   label=None if series["label"] in labelled else series["label"])
            labelled.add(series["label"])
            ax.text(x, value + (error or 0) + 0.8, f"{value:.1f}", ha="center", va="bottom", fontsize=5.5,
                    rotation=90 if len(present) > 3 else 0)
            top = max(top, value + (error or 0))
        baseline = panel.get("baseline", {}).get(group)
        if baseline is not None:
            half = max(len(present), 1) * width / 2 + 0.04
            ax.hlines(baseline, i - half, i + half, colors="black", linestyles="--", linewidth=1.2,
                      label=None if "baseline" in labelled else panel.get("baseline_label", "baseline"))
            labelled.add("baseline")
    ax.set_xticks(range(len(panel["groups"])))
    ax.set_xticklabels(panel["groups"], rotation=30 if len(panel["groups"]) > 4 else 0, ha="right"
                       if len(panel["groups"]) > 4 else "center", fontsize=7)
    ax.set_xlim(-0.6, len(panel["groups"]) - 0.4)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(panel["ylabel"])
    ax.set_title(panel["title"], fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)


def _colors(labels: list[str]) -> dict[str, tuple]:
    """A fixed colour per series label, in order of first appearance (the same in every panel)."""
    import matplotlib
    palette = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["Dark2"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def _nothing(ax) -> None:
    ax.text(0.5, 0.5, "no scores to plot yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
