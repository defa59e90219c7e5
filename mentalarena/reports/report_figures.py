"""The figures of `arena_med.py report`, drawn from the statistics of `mentalarena.reports.report.build`
(one colour per file, the same in every figure). Headless: PNG files only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mentalarena.reports.figures import _pyplot, save

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:grey")


def colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def draw_all(stats: dict, out: Path) -> list[Path]:
    """Every figure the statistics allow; a figure with no file to show is not written."""
    drawn = []
    for draw in (decoder_similarity, decoder_rounds, try_and_reflect, diagnoses, cost, validity):
        path = draw(stats, out)
        if path is not None:
            drawn.append(path)
    return drawn


def _with(stats: dict, key) -> list[tuple[int, str, dict]]:
    return [(i, label, per) for i, (label, per) in enumerate(stats["files"].items()) if key(per)]


def decoder_similarity(stats: dict, out: Path):
    """One panel per decoder item: mean similarity by round, the p10-p90 band, the threshold."""
    files = _with(stats, lambda p: p["decoder"]["sessions"])
    if not files:
        return None
    plt = _pyplot()
    items = list(dict.fromkeys(k for _, _, p in files for k in p["decoder"]["items"]))
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.2), squeeze=False, sharey=True)
    for ax, item in zip(axes[0], items):
        for i, label, per in files:
            rounds = [r for r in per["decoder"]["rounds"] if r["similarity"].get(item, {}).get("n")]
            x = [r["round"] for r in rounds]
            s = [r["similarity"][item] for r in rounds]
            ax.plot(x, [v["mean"] for v in s], marker="o", color=colour(i), label=label)
            ax.fill_between(x, [v["p10"] for v in s], [v["p90"] for v in s], color=colour(i), alpha=0.15)
        for t in sorted({t for _, _, per in files for t in per["decoder"]["thresholds"]}):
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(max(len(p["decoder"]["rounds"]) for _, _, p in files)))
        ax.set_title(item.replace("_", " "), fontsize=8)
        ax.set_xlabel("decoder round (0: before feedback)", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("similarity to the encoded item\n(mean, band p10-p90)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Symptom Decoder: similarity of the doctor's picture to the patient's, round by round", fontsize=9)
    fig.tight_layout()
    return save(fig, out / "decoder_similarity.png")


def _grouped_bars(ax, categories: list[str], series: list[tuple[int, str, list[float]]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for k, (i, label, values) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, color=colour(i), label=label)
    ax.set_xticks(x, categories, fontsize=7)


def decoder_rounds(stats: dict, out: Path):
    """The share of items passing by round; the distribution of feedback rounds per session."""
    files = _with(stats, lambda p: p["decoder"]["sessions"])
    if not files:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, label, per in files:
        rounds = [r for r in per["decoder"]["rounds"] if r["pass_share"] is not None]
        a.plot([r["round"] for r in rounds], [r["pass_share"] for r in rounds], marker="o", color=colour(i), label=label)
    a.set_ylim(-0.05, 1.05)
    a.set_xticks(range(max(len(p["decoder"]["rounds"]) for _, _, p in files)))
    a.set_xlabel("decoder round (0: before feedback)")
    a.set_title("share of items at or above the threshold", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    cats = sorted({int(k) for _, _, p in files for k in p["decoder"]["feedback_rounds"]})
    _grouped_bars(b, [str(c) for c in cats], [
        (i, label, [p["decoder"]["feedback_rounds"].get(str(c), 0) / p["decoder"]["sessions"] for c in cats])
        for i, label, p in files])
    b.set_xlabel("feedback rounds in the session")
    b.set_title("share of sessions", fontsize=9)
    b.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, out / "decoder_rounds.png")


def try_and_reflect(stats: dict, out: Path):
    """Best score so far by try (solid: treatment, dashed: medicine); final scores; fallbacks."""
    files = _with(stats, lambda p: p["try_and_reflect"])
    if not files:
        return None
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.4))
    styles = {"treatment": "-", "medicine": "--"}
    for i, label, per in files:
        for kind, s in per["try_and_reflect"].items():
            y = s["best_so_far"]
            a.plot(range(1, len(y) + 1), y, styles[kind], marker="o", color=colour(i), label=f"{label} {kind}")
    a.set_xlabel("try")
    a.set_ylabel("best health score so far (mean)")
    a.set_title("try and reflect: best so far (searches that stopped keep their best)", fontsize=8)
    a.grid(alpha=0.3)
    a.legend(fontsize=6)
    kinds = [(i, label, kind, s) for i, label, per in files for kind, s in per["try_and_reflect"].items()]
    cats = sorted({int(k) for *_, s in kinds for k in s["final_scores"]})
    width = 0.8 / max(len(kinds), 1)
    for k, (i, label, kind, s) in enumerate(kinds):
        x = np.arange(len(cats)) + (k - (len(kinds) - 1) / 2) * width
        b.bar(x, [s["final_scores"].get(str(c), 0) / s["searches"] for c in cats], width, color=colour(i),
              hatch="//" if kind == "medicine" else None, edgecolor="white", label=f"{label} {kind}")
    b.set_xticks(np.arange(len(cats)), [str(c) for c in cats], fontsize=7)
    b.set_xlabel("final (best) score")
    b.set_title("share of searches by final score (hatched: medicine)", fontsize=8)
    b.grid(alpha=0.3, axis="y")
    _grouped_bars(c, ["treatment", "medicine"], [
        (i, label, [(per["try_and_reflect"].get(k) or {}).get("fallback_share") or 0 for k in ("treatment", "medicine")])
        for i, label, per in files])
    c.set_ylim(0, 1.05)
    c.set_title("share of searches that fell back (no try scored)", fontsize=8)
    c.grid(alpha=0.3, axis="y")
    c.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, out / "try_and_reflect.png")


def diagnoses(stats: dict, out: Path):
    """The most frequent normalised illnesses per file (share of its records); what medicine holds."""
    files = _with(stats, lambda p: p["diagnoses"]["records"])
    if not files:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(files) + 1, figsize=(4.2 * len(files) + 3.4, 3.8), squeeze=False)
    for ax, (i, label, per) in zip(axes[0], files):
        d = per["diagnoses"]
        top = d["top"][:8][::-1]
        ax.barh(range(len(top)), [n / d["records"] for _, n in top], color=colour(i))
        ax.set_yticks(range(len(top)), [(name[:34] + "...") if len(name) > 34 else name or "(empty)" for name, _ in top],
                      fontsize=6)
        ax.set_title(f"{label}: top illnesses ({d['distinct']} distinct / {d['records']})", fontsize=8)
        ax.set_xlabel("share of records", fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    last = axes[0][-1]
    _grouped_bars(last, ["empty", "None-like", "pair dropped"], [
        (i, label, [per["diagnoses"][k] or 0 for k in ("medicine_empty_share", "medicine_none_share",
                                                         "medication_pair_dropped_share")]) for i, label, per in files])
    last.set_ylim(0, 1.05)
    last.set_title("medicine field: share of records", fontsize=8)
    last.legend(fontsize=6)
    last.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, out / "diagnoses.png")


def cost(stats: dict, out: Path):
    """Per session: mean (bar) with p10-p90 (error bar) of calls, tokens, wall time, truncations."""
    files = _with(stats, lambda p: p["cost"]["sessions"])
    if not files:
        return None
    plt = _pyplot()
    panels = [("calls", "model calls"), ("prompt_tokens", "prompt tokens"), ("completion_tokens", "completion tokens"),
              ("elapsed_s", "wall time (s)"), ("truncated_calls", "truncated replies")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for k, (i, _label, per) in enumerate(files):
            s = per["cost"][key]
            if not s.get("n"):
                continue
            ax.bar(k, s["mean"], color=colour(i), yerr=[[s["mean"] - s["p10"]], [s["p90"] - s["mean"]]], capsize=3)
        ax.set_xticks(range(len(files)), [label for _, label, _ in files], fontsize=7, rotation=20)
        ax.set_title(f"{title} per session", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("cost (mean, error bar p10-p90)", fontsize=9)
    fig.tight_layout()
    return save(fig, out / "cost.png")


def validity(stats: dict, out: Path):
    """distinct-1/2 of the SFT answers, embedding diversity and coverage, perplexity."""
    files = _with(stats, lambda p: p["validity"]["answers"])
    if not files:
        return None
    plt = _pyplot()
    div = stats.get("diversity") or {}
    ppl = [(i, label, per["validity"]["perplexity"]) for i, label, per in files
           if (per["validity"].get("perplexity") or {}).get("n")]
    panels = 1 + bool(div) * 2 + bool(ppl)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    a = axes.pop(0)
    same = min(per["validity"]["answers"] for _, _, per in files)
    _grouped_bars(a, ["distinct-1", "distinct-2", f"distinct-1 @{same}", f"distinct-2 @{same}"], [
        (i, label, [per["validity"][k] or 0 for k in ("distinct_1", "distinct_2", "distinct_1_same_size",
                                                      "distinct_2_same_size")]) for i, label, per in files])
    a.set_ylim(0, 1.05)
    a.set_title(f"distinct n-grams of the SFT answers (all; @{same}: the first {same} of each file)", fontsize=7)
    a.legend(fontsize=7)
    a.grid(alpha=0.3, axis="y")
    if div:
        b = axes.pop(0)
        _grouped_bars(b, ["answers", "answers + symptom"], [
            (i, label, [div[k]["mean_pairwise_distance"].get(label) or 0 for k in ("answers", "record")])
            for i, label, _ in files])
        b.set_title("mean pairwise cosine distance", fontsize=8)
        b.grid(alpha=0.3, axis="y")
        c = axes.pop(0)
        labels = [label for _, label, _ in files]
        cov = div["answers"]["coverage"]
        grid = np.array([[np.nan if a_ == b_ else (cov.get(a_, {}).get(b_, {}).get("share") or 0.0) for b_ in labels]
                         for a_ in labels], dtype=float)
        c.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for r in range(len(labels)):
            for q in range(len(labels)):
                if not np.isnan(grid[r, q]):
                    c.text(q, r, f"{grid[r, q]:.2f}", ha="center", va="center", fontsize=7,
                           color="black" if grid[r, q] > 0.6 else "white")
        c.set_xticks(range(len(labels)), labels, fontsize=6, rotation=20)
        c.set_yticks(range(len(labels)), labels, fontsize=6)
        c.set_xlabel("records covered", fontsize=7)
        c.set_ylabel("covered by", fontsize=7)
        c.set_title(f"answers: share within r={div['answers']['radius'] or 0:.3f} of the other", fontsize=8)
    if ppl:
        d = axes.pop(0)
        for k, (i, _label, s) in enumerate(ppl):
            d.bar(k, s["median"], color=colour(i), yerr=[[s["median"] - s["p10"]], [s["p90"] - s["median"]]], capsize=3)
        d.set_xticks(range(len(ppl)), [label for _, label, _ in ppl], fontsize=7, rotation=20)
        d.set_yscale("log")
        d.set_title(f"answer perplexity under {stats.get('perplexity_model')} (median, p10-p90)", fontsize=8)
        d.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, out / "validity.png")
