"""The figures of a compare page (plotly) and the per-group statistics they plot: mean and
sample std across the seeds of a config group, step by step."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

CURVE_KEYS = ("acc/avg_seen", "acc/avg_all")
LLM_KEYS = ("unlearn/model_utility", "unlearn/forget_quality")   # TOFU-style runs (metrics/qa.py)
# How to read the unlearning metrics (table header tooltips, plot hover; docs/metrics.md has
# the formulas). PrivLeak follows MUSE's sign: the best run is the one closest to 0, not the
# lowest, so its table column sorts by |value| (DISTANCE); 1 − mink_auc is its AUC.
CONVENTIONS = {
    "unlearn/privleak": "≈ 0 best (leaks as much as a retain-only model); −100 = not unlearned; "
                        "> 0 = over-unlearned; the column sorts by |value|",
    "unlearn/forget_quality": "higher = closer to a retain-only model (KS p-value)",
    "unlearn/model_utility": "higher = better",
    "unlearn/kfr": "higher = more forgotten",
    "unlearn/krr": "higher = more retained",
    "unlearn/forget_ls": "higher = more fluent",
    "unlearn/mia_auc": "≈ the retrain run's value (0.5 = deleted samples look unseen)",
    "unlearn/forget_acc": "≈ the retrain run's value (not 0)",
}
DISTANCE = {"unlearn/privleak": abs}   # sort key of a table column whose best value is not an end
MAX_HEATMAPS = 12
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class RunData:
    """One MLflow run as the page needs it."""
    run_id: str
    name: str
    status: str
    params: dict
    tags: dict
    final: dict                       # metric -> latest value
    history: dict = field(default_factory=dict)   # metric -> {step: value}
    group: str = ""


# --- statistics -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def curve(runs: list[RunData], key: str) -> tuple[list[int], list[float], list[float], list[int]]:
    """Steps, mean, sample std and number of seeds per step of one metric over a group."""
    steps = sorted({s for r in runs for s in r.history.get(key, {})})
    mean, std, count = [], [], []
    for s in steps:
        vals = [r.history[key][s] for r in runs if s in r.history.get(key, {})]
        m, sd = mean_std(vals)
        mean.append(m)
        std.append(sd)
        count.append(len(vals))
    return steps, mean, std, count


def accuracy_matrix(runs: list[RunData]) -> tuple[list[int], list[int], list[list[float | None]]]:
    cols = sorted({int(k.split("_")[-1]) for r in runs for k in r.history if k.startswith("acc/exp_")})
    steps = sorted({s for r in runs for k in r.history if k.startswith("acc/exp_")
                    for s in r.history[k]})
    z = []
    for s in steps:
        row = []
        for j in cols:
            vals = [r.history[f"acc/exp_{j}"][s] for r in runs
                    if s in r.history.get(f"acc/exp_{j}", {})]
            row.append(sum(vals) / len(vals) if vals else None)
        z.append(row)
    return steps, cols, z


def bar_values(runs: list[RunData]) -> dict[str, tuple[float, float] | None]:
    out = {}
    for key in ("forgetting/avg", "bwt"):
        vals = [r.final[key] for r in runs if key in r.final]
        out[key] = mean_std(vals) if vals else None
    nfr = []
    for r in runs:
        hist = r.history.get("nfr/prev", {})
        pts = [v for s, v in hist.items() if s >= 1] or list(hist.values())
        if pts:
            nfr.append(sum(pts) / len(pts))
    out["nfr/prev"] = mean_std(nfr) if nfr else None
    return out


# --- figures ---------------------------------------------------------------------------------------
def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def fig_curves(groups: dict[str, list[RunData]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy on seen experiences (acc/avg_seen)",
                                                        "accuracy on all experiences (acc/avg_all)"))
    for gi, (label, runs) in enumerate(groups.items()):
        color = COLORS[gi % len(COLORS)]
        for col, key in enumerate(CURVE_KEYS, start=1):
            steps, mean, std, count = curve(runs, key)
            if not steps:
                continue
            x = [s + 1 for s in steps]  # "after experience 1..n"
            upper = [m + s for m, s in zip(mean, std)]
            lower = [m - s for m, s in zip(mean, std)]
            fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", mode="lines",
                                     fillcolor=_rgba(color, 0.18), line=dict(width=0),
                                     hoverinfo="skip", showlegend=False, legendgroup=label),
                          row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=col == 1,
                                     line=dict(color=color, width=2),
                                     customdata=list(zip(std, count)),
                                     hovertemplate="%{y:.3f} ± %{customdata[0]:.3f} "
                                                   "(%{customdata[1]} seeds)<extra>" +
                                                   html.escape(label) + "</extra>"),
                          row=1, col=col)
    if not fig.data:   # e.g. only TOFU-style runs, which log no acc/avg_* curve
        return None
    fig.update_xaxes(title_text="after experience", dtick=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    fig.update_layout(height=420, margin=dict(t=50, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.2), template="plotly_white")
    return fig


def fig_heatmaps(groups: dict[str, list[RunData]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = [(label, accuracy_matrix(runs)) for label, runs in groups.items()][:MAX_HEATMAPS]
    items = [(label, m) for label, m in items if m[0]]
    if not items:
        return None
    ncols = min(3, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[label for label, _ in items],
                        horizontal_spacing=0.08, vertical_spacing=0.18 / max(1, nrows - 1) + 0.08)
    for k, (label, (steps, cols, z)) in enumerate(items):
        fig.add_trace(go.Heatmap(z=z, x=[f"exp {j}" for j in cols],
                                 y=[f"after {s + 1}" for s in steps], zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=k == 0,
                                 text=[[("" if v is None else f"{v:.2f}") for v in row] for row in z],
                                 texttemplate="%{text}", hovertemplate="%{y}, %{x}: %{z:.3f}"
                                 "<extra>" + html.escape(label) + "</extra>"),
                      row=k // ncols + 1, col=k % ncols + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(320, 300 * nrows), margin=dict(t=60, b=40, l=70, r=20),
                      template="plotly_white")
    return fig


def fig_bars(groups: dict[str, list[RunData]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = {"forgetting/avg": "forgetting (final, Chaudhry)", "bwt": "BWT (final)",
              "nfr/prev": "negative flip rate (mean over updates)"}
    values = {label: bar_values(runs) for label, runs in groups.items()}
    keys = [k for k in titles if any(v[k] is not None for v in values.values())]
    if not keys:
        return None
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[titles[k] for k in keys])
    labels = list(groups)
    for c, key in enumerate(keys, start=1):
        xs = [label for label in labels if values[label][key] is not None]
        fig.add_trace(go.Bar(x=xs, y=[values[label][key][0] for label in xs],
                             error_y=dict(type="data", array=[values[label][key][1] for label in xs]),
                             marker_color=[COLORS[labels.index(label) % len(COLORS)] for label in xs],
                             showlegend=False, hovertemplate="%{x}: %{y:.4f}<extra></extra>"),
                      row=1, col=c)
    fig.update_layout(height=380, margin=dict(t=50, b=90, l=50, r=20), template="plotly_white")
    return fig


def fig_unlearning(groups: dict[str, list[RunData]]):
    import plotly.graph_objects as go

    rows = [(label, r) for label, runs in groups.items() for r in runs
            if "unlearn/retain_acc" in r.final and "unlearn/forget_acc" in r.final]
    if not rows:
        return None
    costs = [r.final.get("unlearn/serve_s") for _, r in rows]
    known = [c for c in costs if c is not None]
    top = max(known) if known else 0.0
    fig = go.Figure()
    labels = list(groups)
    for label in labels:
        pts = [(r, c) for (lab, r), c in zip(rows, costs) if lab == label]
        if not pts:
            continue
        sizes = [10 + 30 * (c / top) if (c is not None and top > 0) else 14 for _, c in pts]
        hover = [f"{html.escape(r.name)}<br>serve cost: {c if c is not None else 'n/a'} s"
                 f"<br>MIA AUC: {r.final.get('unlearn/mia_auc', 'n/a')}"
                 f"<br>test acc: {r.final.get('unlearn/test_acc', 'n/a')}" for r, c in pts]
        fig.add_trace(go.Scatter(x=[r.final["unlearn/retain_acc"] for r, _ in pts],
                                 y=[1 - r.final["unlearn/forget_acc"] for r, _ in pts],
                                 mode="markers", name=label, text=hover,
                                 marker=dict(size=sizes, color=COLORS[labels.index(label) % len(COLORS)],
                                             opacity=0.8, line=dict(width=1, color="#333")),
                                 hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>"))
    fig.update_layout(height=420, template="plotly_white", margin=dict(t=40, b=50, l=60, r=20),
                      xaxis_title="retain accuracy (unlearn/retain_acc)",
                      yaxis_title="forget quality (1 − unlearn/forget_acc)",
                      title="unlearning trade-off (marker size: serve cost unlearn/serve_s)")
    return fig


def fig_llm_unlearning(groups: dict[str, list[RunData]]):
    """TOFU's trade-off plot: model utility (x) vs forget quality (y, log scale) of each run's
    final model, with the fine-tuned model before the deletion (step 0) as a hollow marker
    joined to it, so the path of each method is visible; hover shows KFR / KRR / LS / PrivLeak."""
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = list(groups)
    found = False
    for label in labels:
        runs = [r for r in groups[label] if all(k in r.final for k in LLM_KEYS)]
        if not runs:
            continue
        found = True
        color = COLORS[labels.index(label) % len(COLORS)]
        for r in runs:
            u, q = r.history.get(LLM_KEYS[0], {}), r.history.get(LLM_KEYS[1], {})
            first = min(set(u) & set(q), default=None)
            if first is not None and first != max(u):
                fig.add_trace(go.Scatter(x=[u[first], r.final[LLM_KEYS[0]]], y=[q[first], r.final[LLM_KEYS[1]]],
                                         mode="lines+markers", showlegend=False, hoverinfo="skip",
                                         line=dict(color=color, width=1, dash="dot"),
                                         marker=dict(symbol=["circle-open", "circle"], size=[10, 1],
                                                     color=color)))
        hover = [f"{html.escape(r.name)}" + "".join(
            f"<br>{k.split('/')[1]}: {r.final[k]:.4g}"
            + (" (≈ 0 best, −100 not unlearned)" if k == "unlearn/privleak" else "") for k in
            ("unlearn/kfr", "unlearn/krr", "unlearn/forget_ls", "unlearn/privleak", "unlearn/serve_s")
            if k in r.final) for r in runs]
        fig.add_trace(go.Scatter(x=[r.final[LLM_KEYS[0]] for r in runs],
                                 y=[max(r.final[LLM_KEYS[1]], 1e-30) for r in runs],
                                 mode="markers", name=label, text=hover,
                                 marker=dict(size=14, color=color, line=dict(width=1, color="#333")),
                                 hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>"))
    if not found:
        return None
    fig.update_yaxes(type="log", title_text="forget quality (unlearn/forget_quality, log)")
    fig.update_xaxes(title_text="model utility (unlearn/model_utility)")
    fig.update_layout(height=420, template="plotly_white", margin=dict(t=40, b=50, l=60, r=20),
                      title="hollow: before the deletion (after fine-tuning); filled: after unlearning")
    return fig
