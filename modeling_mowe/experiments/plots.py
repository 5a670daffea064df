"""The experiments' figures: loss curves, routing per task, the study's pooled differences and routing over steps.

Figures are drawn on `matplotlib.figure.Figure` (no pyplot, no global backend), so importing this changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .analysis import WER_ROWS


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out `fig` and write it to `path` (PNG, 120 dpi); returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def draw_plots(histories: dict[str, list[dict]], routing: dict, encoder_names: list[str], out: Path) -> list[Path]:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="step", ylabel="training loss", title="Alignment, then the two arms", yscale="log")
    ax.legend()
    paths = [save_figure(fig, out / "loss_curves.png")]

    fig = Figure(figsize=(5 * len(routing), 3.6))
    axes = fig.subplots(1, len(routing), squeeze=False)
    for ax, (router, per_task) in zip(axes[0], routing.items()):
        tasks = list(per_task)
        image = annotated_grid(ax, [per_task[t] for t in tasks], encoder_names, tasks)
        ax.set_title(f"{router} router: chosen encoder")
        fig.colorbar(image, ax=ax, fraction=0.046)
    paths.append(save_figure(fig, out / "routing_by_task.png"))
    return paths


def annotated_grid(ax, grid: list[list[float]], columns: list[str], rows: list[str]):
    """`grid` (rows x columns, values in [0, 1]) as a heatmap with each value written in its cell; the image."""
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
    return image


def draw_probe_heatmap(accuracy: dict[str, dict[str, float]], chance: dict[str, float], path: Path) -> Path:
    """Who knows what: `accuracy[task][encoder]` (held-out probe accuracy) as a heatmap, tasks down and encoders
    across, with each task's `chance` level as the first column."""
    tasks = list(accuracy)
    encoders = list(dict.fromkeys(e for row in accuracy.values() for e in row))
    grid = [[chance[t], *(accuracy[t].get(e, float("nan")) for e in encoders)] for t in tasks]
    fig = Figure(figsize=(0.9 * len(encoders) + 3, 0.5 * len(tasks) + 2.5))
    ax = fig.subplots()
    names = [e.removesuffix(", dynamic").removesuffix(" frozen") for e in encoders]
    image = annotated_grid(ax, grid, ["chance", *names], tasks)
    ax.set_title("Linear probe on frozen features: held-out accuracy", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, Path(path))


def draw_study_plots(pooled: dict, intervals: dict, histories: dict, reference: str, out: Path) -> list[Path]:
    """`study_differences.png`: each row's pooled difference to `reference` in score units (accuracy, or -WER) with
    its 95% interval, per arm; `routing_over_steps.png`: per-encoder usage and routing entropy over the training
    steps of each MoWE arm (first seed)."""
    rows = [*pooled[reference]["tasks"], "average_score"]
    arms = [a for a in pooled if a != reference]
    fig = Figure(figsize=(1.3 * len(rows) + 2, 4))
    ax = fig.subplots()
    for k, arm in enumerate(arms):
        x = [i + (k - (len(arms) - 1) / 2) * 0.2 for i in range(len(rows))]
        points, errors = [], [[], []]
        for row in rows:
            sign = -1.0 if row in WER_ROWS else 1.0
            if row == "average_score":
                value = pooled[arm]["summary"][row] - pooled[reference]["summary"][row]
            else:
                value = pooled[arm]["tasks"][row]["value"] - pooled[reference]["tasks"][row]["value"]
            low, high = sorted(sign * b for b in intervals[row][f"{arm} - {reference}"])
            points.append(sign * value)
            errors[0].append(max(sign * value - low, 0.0))
            errors[1].append(max(high - sign * value, 0.0))
        ax.errorbar(x, points, yerr=errors, fmt="o", capsize=3, label=arm)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r} (-WER)" if r in WER_ROWS else r for r in rows], rotation=20)
    ax.set(ylabel=f"score difference to {reference}", title="Pooled over seeds, 95% paired bootstrap intervals")
    ax.legend(fontsize=8)
    paths = [save_figure(fig, out / "study_differences.png")]

    fig = Figure(figsize=(4.5 * max(1, len(histories)), 6))
    axes = fig.subplots(2, max(1, len(histories)), squeeze=False)
    for column, (arm, history) in enumerate(histories.items()):
        logged = [h for h in history if any(k.startswith("routing/") for k in h)]
        steps = [h["step"] for h in logged]
        keys = sorted({k for h in logged for k in h if k.startswith("routing/") and k != "routing/aux_loss"})
        for key in keys:
            target = axes[1][column] if key.endswith("/entropy") else axes[0][column]
            target.plot(steps, [h.get(key, float("nan")) for h in logged], label=key.removeprefix("routing/"))
        axes[0][column].set(title=arm, ylabel="fraction of clips per weak encoder", ylim=(0, 1))
        axes[1][column].set(xlabel="step", ylabel="routing entropy (nats)")
        for ax in axes[:, column]:
            ax.legend(fontsize=6)
    paths.append(save_figure(fig, out / "routing_over_steps.png"))
    return paths
