"""The report's plots: matplotlib figures rendered by the Agg canvas to PNG bytes.

``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly, never pyplot: no global figure state, no
GUI backend chosen behind our back, safe to call from a training process or a server thread.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import RunData

# Metrics on a 0-100 scale (sacrebleu's); drawn divided by 100 next to the 0-1 ones.
PERCENT_METRICS = ("chrf", "bleu")
COLORS = {"train": "#7aa6d8", "train_mean": "#1f5fa8", "val": "#d1495b", "best": "#2a9d4b", "stop": "#b00020",
          "overfit": "#e07b00", "lr": "#6a4c93", "base": "#9aa5b1", "tuned": "#2a9d4b"}


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_plot(run: RunData) -> bytes | None:
    """Training loss per step, validation loss per evaluation, the best step, early stopping, overfit warnings."""
    steps, evals = run.train_steps, run.evals
    if not steps and not evals:
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    if steps:
        ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], color=COLORS["train"], lw=1,
                label="train loss (per step)")
    means = [e for e in evals if e.get("train_loss") is not None]
    if means:
        ax.plot([e["step"] for e in means], [e["train_loss"] for e in means], "s--", color=COLORS["train_mean"], ms=4,
                lw=1, label="train loss (mean since last eval)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color=COLORS["val"], ms=5,
                label="validation loss")
    best_step, best_loss = run.best
    if best_step is not None and best_loss is not None:
        ax.plot([best_step], [best_loss], "*", color=COLORS["best"], ms=16, label=f"best (step {best_step})", zorder=5)
    _mark_events(ax, run)
    objective = (run.config.get("objective") or {}).get("name", "sft")
    ylabel = {"sft": "loss (nats per target token)", "kto": "kto loss (per answer)",
              "grpo": "grpo loss; validation: minus the held-out grade"}.get(objective, f"{objective} loss (per pair)")
    _label(ax, ylabel, "training and validation loss")
    return png(fig)


def lr_plot(run: RunData) -> bytes | None:
    steps = run.train_steps
    if not steps:
        return None
    fig = Figure(figsize=(8, 2.6))
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in steps], [e["lr"] for e in steps], color=COLORS["lr"])
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _label(ax, "learning rate", "learning-rate schedule", legend=False)
    return png(fig)


def metrics_plot(run: RunData) -> bytes | None:
    """Task metrics at each evaluation (chrf and bleu divided by 100 to share the 0-1 axis)."""
    names = run.metric_names
    evals = [e for e in run.evals if e.get("metrics")]
    if not names or not evals:
        return None
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    for name in names:
        pts = [(e["step"], e["metrics"][name]) for e in evals if e["metrics"].get(name) is not None]
        scale = 100.0 if name in PERCENT_METRICS else 1.0
        ax.plot([s for s, _ in pts], [v / scale for _, v in pts], "o-", ms=4,
                label=f"{name}/100" if scale != 1 else name)
    _mark_events(ax, run)
    _label(ax, "score", "task metrics on the fixed validation subset")
    return png(fig)


def objective_plot(run: RunData) -> bytes | None:
    """A preference run's held-out figures at each evaluation: the rewards of chosen and rejected answers and their
    margin (nats, left axis), the share of pairs ranked right (right axis). Falling chosen and rejected rewards
    together, with the margin growing, is the known failure where the model unlearns both answers."""
    evals = [e for e in run.evals if e.get("stats")]
    if not evals or "rewards/accuracy" not in evals[-1]["stats"]:
        return None
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    steps = [e["step"] for e in evals]
    for name, color in (("rewards/chosen", COLORS["tuned"]), ("rewards/rejected", COLORS["stop"]),
                        ("rewards/margins", COLORS["lr"])):
        ax.plot(steps, [e["stats"].get(name) for e in evals], "o-", ms=4, color=color, label=name)
    ax.axhline(0.0, color=COLORS["base"], lw=0.8)
    right = ax.twinx()
    right.plot(steps, [e["stats"].get("rewards/accuracy") for e in evals], "s--", ms=4, color=COLORS["val"],
               label="rewards/accuracy (right)")
    right.set_ylim(0, 1.05)
    right.set_ylabel("pairs ranked right")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    _label(ax, "reward (nats)", "held-out preference figures", legend=False)
    return png(fig)


def reward_plot(run: RunData) -> bytes | None:
    """A reinforcement run's grades: the mean reward of the sampled answers at each step and of the greedy answers to
    the held-out prompts at each evaluation (left axis), and the share of prompts whose answers all scored alike
    (right axis: those teach nothing). Training reward rising while held-out reward falls is reward hacking."""
    steps = [e for e in run.train_steps if "reward" in (e.get("stats") or {})]
    if not steps:
        return None
    evals = [e for e in run.evals if "reward" in (e.get("stats") or {})]
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in steps], [e["stats"]["reward"] for e in steps], color=COLORS["train"], lw=1,
            label="reward of the sampled answers (per step)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["stats"]["reward"] for e in evals], "o-", ms=5, color=COLORS["val"],
                label="held-out reward (greedy answers)")
        sampled = [e for e in evals if "reward_sampled" in e["stats"]]
        if sampled:
            ax.plot([e["step"] for e in sampled], [e["stats"]["reward_sampled"] for e in sampled], "s--", ms=4,
                    color=COLORS["val"], alpha=0.6, label="held-out reward (sampled answers)")
    right = ax.twinx()
    right.plot([e["step"] for e in steps], [e["stats"].get("frac_reward_zero_std") for e in steps], ":",
               color=COLORS["base"], label="prompts with no reward spread (right)")
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of prompts")
    handles, more = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    _mark_events(ax, run)
    _label(ax, "mean grade", "rewards during training and on held-out prompts", legend=False)
    return png(fig)


def answer_plot(run: RunData) -> bytes | None:
    """A reinforcement run's answers step by step: their mean length and the share cut at the length limit (answers
    that shrink to nothing or grow to the limit are a failure to see early), and the policy's mean entropy at the answer
    tokens (right axis: a collapse toward 0 means the samples of a group stop differing)."""
    steps = [e for e in run.train_steps if "completion_length" in (e.get("stats") or {})]
    if not steps:
        return None
    x = [e["step"] for e in steps]
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    ax.plot(x, [e["stats"]["completion_length"] for e in steps], color=COLORS["train"], lw=1,
            label="mean answer length (tokens)")
    right = ax.twinx()
    right.plot(x, [e["stats"].get("clipped_completions") for e in steps], ":", color=COLORS["base"],
               label="share cut at the length limit (right)")
    if any("entropy" in e["stats"] for e in steps):
        right.plot(x, [e["stats"].get("entropy") for e in steps], "--", color=COLORS["val"],
                   label="mean entropy, nats (right)")
    right.set_ylabel("share / nats")
    handles, more = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    _mark_events(ax, run)
    _label(ax, "tokens", "the sampled answers: length, cut share and entropy", legend=False)
    return png(fig)


def comparison_plot(compare: dict | None) -> bytes | None:
    """Grouped bars, base against tuned, for every text metric in compare.json."""
    if not compare:
        return None
    base, tuned = compare.get("base", {}).get("metrics", {}), compare.get("tuned", {}).get("metrics", {})
    names = [n for n in tuned if base.get(n) is not None and tuned.get(n) is not None]
    if not names:
        return None
    scale = [100.0 if n in PERCENT_METRICS else 1.0 for n in names]
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [base[n] / s for n, s in zip(names, scale)], 0.4, label="base", color=COLORS["base"])
    ax.bar([i + 0.2 for i in x], [tuned[n] / s for n, s in zip(names, scale)], 0.4, label="tuned",
           color=COLORS["tuned"])
    ax.set_xticks(list(x), [f"{n}/100" if s != 1 else n for n, s in zip(names, scale)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"base versus tuned on {compare.get('examples', '?')} held-out examples")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def _label(ax, ylabel: str, title: str, legend: bool = True) -> None:
    """The finish every curve over optimizer steps shares: axis labels, title, light grid, legend."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _mark_events(ax, run: RunData) -> None:
    """Vertical lines where overfitting was flagged and where early stopping fired."""
    for i, w in enumerate(run.overfit_warnings):
        ax.axvline(w["step"], color=COLORS["overfit"], ls="--", lw=1.2,
                   label="overfitting warning" if i == 0 else None)
    stop = run.early_stop
    if stop:
        ax.axvline(stop["step"], color=COLORS["stop"], ls="-", lw=1.5, label=f"early stop (step {stop['step']})")
