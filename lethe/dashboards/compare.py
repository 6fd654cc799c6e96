"""`lethe compare`: MLflow runs → one self-contained HTML comparison page.

The page works offline (plotly.js is inlined) and shows, per *config group* (runs whose
params are equal except the seed and bookkeeping keys):

- accuracy vs experience (``acc/avg_seen``, ``acc/avg_all``): mean ± std band across seeds;
- the accuracy matrix (``acc/exp_<j>`` after each experience), averaged over seeds;
- forgetting / BWT / NFR bars (final Chaudhry forgetting, final BWT, mean negative flip rate
  between consecutive models) with std error bars;
- an unlearning trade-off scatter (forget quality vs retain accuracy, marker size = serve
  cost) when runs logged ``unlearn/*`` metrics;
- a sortable table of runs: status, the params that differ, final metrics.

Sweep parents are left out (they hold no metrics); a parent run id given to ``--runs``
stands for its members, and when every compared run belongs to one sweep the page is also
logged as ``compare.html`` on that parent run.
"""
from __future__ import annotations

import html
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lethe.platform.errors import ConfigError

PARENT_ROLE_TAG = "lethe.sweep.role"
PARENT_TAG = "lethe.sweep.parent"
# Params that do not make two runs different configurations.
IGNORED_PREFIXES = ("tracking.", "checkpoint.")
IGNORED_KEYS = {"seed", "device", "eval.batch_size", "train.num_workers", "eval.save_predictions"}
CURVE_KEYS = ("acc/avg_seen", "acc/avg_all")
PLOTTED_STATUS = ("FINISHED", "RUNNING")
TABLE_METRICS = ("acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt", "fwt", "nfr/prev",
                 "unlearn/forget_acc", "unlearn/retain_acc", "unlearn/test_acc", "unlearn/mia_auc",
                 "unlearn/serve_s", "unlearn/retrain_samples", "params/trainable",
                 "unlearn/model_utility", "unlearn/forget_quality", "unlearn/forget_ls", "unlearn/kfr",
                 "unlearn/krr", "unlearn/privleak")
LLM_KEYS = ("unlearn/model_utility", "unlearn/forget_quality")   # TOFU-style runs (metrics/qa.py)
MAX_HEATMAPS = 12
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class RunData:
    run_id: str
    name: str
    status: str
    params: dict
    tags: dict
    final: dict                       # metric -> latest value
    history: dict = field(default_factory=dict)   # metric -> {step: value}
    group: str = ""


@dataclass
class ComparePage:
    path: Path
    n_runs: int
    n_groups: int
    logged_to: str | None             # parent run id the page was logged to


# --- MLflow queries -----------------------------------------------------------------------------
def _client(tracking_uri: str | None):
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri), uri


def _is_parent(run) -> bool:
    return run.data.tags.get(PARENT_ROLE_TAG) == "parent"


def select_runs(client, experiment: str | None = None, run_ids: list[str] | None = None) -> list:
    """MLflow runs to compare: the given ids (a sweep parent expands to its members) or every
    live run of the experiment except sweep parents."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except Exception:
                raise ConfigError(f"--runs: no MLflow run '{rid}' at {client.tracking_uri}") from None
            if _is_parent(run):
                runs += client.search_runs([run.info.experiment_id],
                                           filter_string=f"tags.`{PARENT_TAG}` = '{rid}'",
                                           max_results=5000)
            else:
                runs.append(run)
        return _dedupe(runs)
    if not experiment:
        raise ConfigError("give --experiment NAME or --runs RUN_ID ...")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        from lethe import registry

        raise ConfigError(f"no MLflow experiment '{experiment}' at {client.tracking_uri}"
                          f"{registry.suggest(experiment, names)} (experiments there: "
                          f"{', '.join(names) or 'none'}; set tracking.uri=... for another store)")
    runs = client.search_runs([exp.experiment_id], max_results=5000,
                              order_by=["attributes.start_time ASC"])
    return [r for r in runs if not _is_parent(r)]


def _dedupe(runs: list) -> list:
    seen, out = set(), []
    for r in runs:
        if r.info.run_id not in seen:
            seen.add(r.info.run_id)
            out.append(r)
    return out


def load_runs(client, runs: list) -> list[RunData]:
    out = []
    for run in runs:
        metrics = dict(run.data.metrics)
        keys = [k for k in metrics if k in CURVE_KEYS + LLM_KEYS or k.startswith("acc/exp_")
                or k == "nfr/prev"]
        history = {}
        for key in keys:
            points: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(run.info.run_id, key):
                # a resumed run may log a step twice: keep the newest value
                if m.step not in points or m.timestamp >= points[m.step][0]:
                    points[m.step] = (m.timestamp, m.value)
            history[key] = {s: v for s, (_, v) in sorted(points.items())}
        out.append(RunData(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                           run.info.status, dict(run.data.params), dict(run.data.tags), metrics,
                           history))
    return out


# --- grouping and statistics ------------------------------------------------------------------
def _config_key(params: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items()
                        if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)))


def group_runs(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs with equal params up to seed/bookkeeping share a group, labelled by the params
    that differ between groups: first the keys every config has (``method.name``,
    ``train.lr``), then, only where that leaves two groups alike, method-specific keys."""
    keys = {r.run_id: _config_key(r.params) for r in runs}
    distinct = sorted(set(keys.values()))
    dicts = [dict(key) for key in distinct]
    all_keys = sorted({k for d in dicts for k in d})
    differs = [k for k in all_keys if len({d.get(k) for d in dicts}) > 1]
    common = [k for k in differs if all(k in d for d in dicts)]
    labels = [", ".join(f"{k}={d[k]}" for k in common) for d in dicts]
    for label in {lab for lab in labels if labels.count(lab) > 1}:
        idx = [i for i, lab in enumerate(labels) if lab == label]  # alike: add what tells them apart
        extra = [k for k in all_keys if len({dicts[i].get(k) for i in idx}) > 1]
        for i in idx:
            parts = [label] + [f"{k}={dicts[i].get(k, '-')}" for k in extra]
            labels[i] = ", ".join(x for x in parts if x)
    groups: dict[str, list[RunData]] = {}
    for key, d, label in zip(distinct, dicts, labels):
        label = label or d.get("method.name", "runs")
        members = [r for r in runs if keys[r.run_id] == key]
        for r in members:
            r.group = label
        groups[label] = members
    return groups


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
            f"<br>{k.split('/')[1]}: {r.final[k]:.4g}" for k in
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


# --- page -------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em} .plot{width:100%}
table.sortable{border-collapse:collapse;font-size:.85em;width:100%}
table.sortable th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;user-select:none}
table.sortable th,table.sortable td{border:1px solid #ddd;padding:4px 6px;text-align:left}
table.sortable td.num{text-align:right;font-variant-numeric:tabular-nums}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
.FAILED,.KILLED{color:#b00020;font-weight:600} .RUNNING,.SCHEDULED{color:#a36b00}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var raw = cell.hasAttribute('data-value') ? cell.getAttribute('data-value') : cell.textContent;
        var num = parseFloat(raw);
        return raw === '' ? null : (isNaN(num) ? raw : num);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def table_html(runs: list[RunData], groups: dict[str, list[RunData]]) -> str:
    # params whose set values differ (a key only some methods have, with one value, is noise)
    varying = sorted({k for r in runs for k in r.params
                      if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
                      and len({x.params[k] for x in runs if k in x.params}) > 1})
    metrics = [m for m in TABLE_METRICS if any(m in r.final for r in runs)]
    head = ["run", "group", "seed", "status"] + metrics + varying
    out = ["<table class='sortable' id='runs'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in runs:
        cells = [f"<td title='{html.escape(r.run_id)}'>{html.escape(r.name)}</td>",
                 f"<td>{html.escape(r.group)}</td>",
                 f"<td class='num'>{html.escape(r.params.get('seed', ''))}</td>",
                 f"<td class='{html.escape(r.status)}'>{html.escape(r.status)}</td>"]
        for m in metrics:
            v = r.final.get(m)
            cells.append(f"<td class='num' data-value='{'' if v is None else repr(float(v))}'>"
                         f"{_fmt(v)}</td>")
        cells += [f"<td>{html.escape(r.params.get(k, ''))}</td>" for k in varying]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_page(runs: list[RunData], title: str, subtitle: str) -> str:
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    # group every run (the table lists failed runs too); plot finished and running runs only,
    # so a member that died half-way does not skew its group's mean
    groups = {}
    for label, members in group_runs(runs).items():
        plotted = [r for r in members if r.status in PLOTTED_STATUS
                   and any(k in r.history for k in CURVE_KEYS + LLM_KEYS)]
        if plotted:
            groups[label] = plotted
    sections = []
    config = {"displaylogo": False, "responsive": True}
    figs = [("Accuracy vs experience (mean ± std across seeds)", "curves", fig_curves(groups)),
            ("Accuracy matrices (mean over seeds; row = after experience i, column = test "
             "experience j)", "heatmaps", fig_heatmaps(groups)),
            ("Forgetting, backward transfer and negative flips (mean ± std across seeds)", "bars",
             fig_bars(groups)),
            ("Unlearning trade-off", "unlearning", fig_unlearning(groups)),
            ("LLM unlearning: forget quality vs model utility (TOFU)", "llm_unlearning",
             fig_llm_unlearning(groups))]
    for heading, div_id, fig in figs:
        if fig is None or not groups:
            continue
        body = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                           config=config, default_width="100%")
        sections.append(f"<section><h2>{html.escape(heading)}</h2><div class='plot'>{body}</div></section>")
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    sections.append("<section><h2>Runs (click a column to sort)</h2>" + table_html(runs, groups)
                    + "</section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style>"
            "<script type='text/javascript'>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(subtitle)} · {len(runs)} runs "
            f"({html.escape(status)}) in {len(groups)} config groups · generated "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} by lethe compare</p>"
            + "".join(sections) + f"<script type='text/javascript'>{SORT_JS}</script></body></html>")


def write_compare(tracking_uri: str | None = None, experiment: str | None = None,
                  run_ids: list[str] | None = None, out: str | Path | None = None,
                  title: str | None = None, log_to: str | None = "auto") -> ComparePage:
    """Query MLflow, write the page to ``out`` and (for a sweep) log it on the parent run.

    log_to: a run id, ``"auto"`` (the sweep parent shared by every compared run, if any) or None.
    """
    client, uri = _client(tracking_uri)
    runs = load_runs(client, select_runs(client, experiment, run_ids))
    if not any(any(k in r.history for k in CURVE_KEYS + LLM_KEYS) for r in runs):
        where = f"experiment '{experiment}'" if experiment and not run_ids else "the given runs"
        raise ConfigError(f"nothing to compare: no run in {where} at {uri} logged acc/avg_seen "
                          f"or unlearn/model_utility "
                          f"({len(runs)} runs found)")
    name = experiment or (client.get_experiment(client.get_run(runs[0].run_id).info.experiment_id).name)
    title = title or f"lethe compare: {name}"
    out = Path(out or f"compare-{name}.html").expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(runs, title, f"experiment '{name}' at {uri}"), encoding="utf-8")
    parent = None
    if log_to == "auto":
        parents = {r.tags.get(PARENT_TAG) for r in runs}
        log_to = parents.pop() if len(parents) == 1 else None
    if log_to:
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "compare.html"
            page.write_bytes(out.read_bytes())
            client.log_artifact(log_to, str(page))
        parent = log_to
    groups = {r.group for r in runs}
    return ComparePage(out.resolve(), len(runs), len(groups), parent)


def page_summary(page: ComparePage) -> str:
    text = f"wrote {page.path} ({page.n_runs} runs, {page.n_groups} config groups)"
    if page.logged_to:
        text += f"; logged as artifact compare.html of sweep parent run {page.logged_to}"
    return text


__all__ = ["write_compare", "render_page", "select_runs", "load_runs", "group_runs", "curve",
           "accuracy_matrix", "mean_std", "ComparePage", "page_summary"]
