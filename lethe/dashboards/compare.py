"""`lethe compare`: MLflow runs → one self-contained HTML comparison page.

The page works offline (plotly.js is inlined) and shows, per *config group* (runs whose
params are equal except the seed and bookkeeping keys):

- accuracy vs experience (``acc/avg_seen``, ``acc/avg_all``): mean ± std band across seeds;
- the accuracy matrix (``acc/exp_<j>`` after each experience), averaged over seeds;
- forgetting / BWT / NFR bars (final Chaudhry forgetting, final BWT, mean negative flip rate
  between consecutive models) with std error bars;
- an unlearning trade-off scatter (forget quality vs retain accuracy, marker size = serve
  cost) when runs logged ``unlearn/*`` metrics;
- for groups whose runs carry a ``paper:`` block (paper presets, docs/paper-presets.md): the
  metric it names as measured mean ± sample std across seeds beside the paper's number
  ("unverified" when the preset could not check it); the block never splits a group;
- a sortable table of runs: status, the params that differ, final metrics (a header's tooltip
  says which way is better; ``unlearn/privleak`` follows MUSE's sign, ≈ 0 best, and sorts by
  its distance from 0).

Parent runs of ``lethe run --seeds N`` and of ``lethe sweep`` are left out (they hold only
aggregates; their members are the runs compared, grouped like any runs). A parent run id
given to ``--runs`` stands for its members, and when every compared run belongs to one
parent the page is also logged as ``compare.html`` on that parent run. Both the tags of
:mod:`lethe.tags` and those of runs logged by older versions are understood.
"""
from __future__ import annotations

import html
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lethe import tags as T
from lethe.dashboards.figures import (
    CONVENTIONS,
    CURVE_KEYS,
    DISTANCE,
    LLM_KEYS,
    RunData,
    accuracy_matrix,
    curve,
    fig_bars,
    fig_curves,
    fig_heatmaps,
    fig_llm_unlearning,
    fig_unlearning,
    mean_std,
)
from lethe.errors import ConfigError

# Params that do not make two runs different configurations (a paper block only documents).
IGNORED_PREFIXES = ("tracking.", "checkpoint.", "paper.", "requires")
IGNORED_KEYS = {"seed", "device", "eval.batch_size", "train.num_workers", "eval.save_predictions"}
PLOTTED_STATUS = ("FINISHED", "RUNNING")
TABLE_METRICS = ("acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt", "fwt", "nfr/prev",
                 "unlearn/forget_acc", "unlearn/retain_acc", "unlearn/test_acc", "unlearn/mia_auc",
                 "unlearn/serve_s", "unlearn/retrain_samples", "params/trainable",
                 "unlearn/model_utility", "unlearn/forget_quality", "unlearn/forget_ls", "unlearn/kfr",
                 "unlearn/krr", "unlearn/privleak")


@dataclass
class ComparePage:
    path: Path
    n_runs: int
    n_groups: int
    logged_to: str | None             # parent run id the page was logged to


# --- MLflow queries -----------------------------------------------------------------------------
def _client(tracking_uri: str | None):
    """A client of the store; the platform resolves the URI (None: MLflow's own choice)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return client, client.tracking_uri


def _is_parent(run) -> bool:
    return T.is_parent(run.data.tags)


def _members(client, parent) -> list:
    """The live child runs of a seeds or sweep parent (all kinds nest through MLflow's tag)."""
    return client.search_runs([parent.info.experiment_id], max_results=5000,
                              filter_string=f"tags.`{T.PARENT_RUN}` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"])


def select_runs(client, experiment: str | None = None, run_ids: list[str] | None = None) -> list:
    """MLflow runs to compare: the given ids (a seeds/sweep parent expands to its members) or
    every live run of the experiment except such parents."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except Exception:
                raise ConfigError(f"--runs: no MLflow run '{rid}' at {client.tracking_uri}") from None
            if _is_parent(run):
                runs += _members(client, run)
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


# --- grouping -------------------------------------------------------------------------------
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
    out += [f"<th title='{html.escape(CONVENTIONS[h])}'>{html.escape(h)}</th>" if h in CONVENTIONS
            else f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in runs:
        cells = [f"<td title='{html.escape(r.run_id)}'>{html.escape(r.name)}</td>",
                 f"<td>{html.escape(r.group)}</td>",
                 f"<td class='num'>{html.escape(r.params.get('seed', ''))}</td>",
                 f"<td class='{html.escape(r.status)}'>{html.escape(r.status)}</td>"]
        for m in metrics:   # data-value is the sort key: the value, or its distance from the best
            v = r.final.get(m)
            key = None if v is None else float(DISTANCE.get(m, float)(v))
            cells.append(f"<td class='num' data-value='{'' if key is None else repr(key)}'>"
                         f"{_fmt(v)}</td>")
        cells += [f"<td>{html.escape(r.params.get(k, ''))}</td>" for k in varying]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _paper_value(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):   # "None": the preset's number is unverified
        return None


def paper_rows(groups: dict[str, list[RunData]]) -> list[dict]:
    """One row per group whose runs carry a paper block (``paper.*`` params): the metric it
    names, its measured mean ± sample std over the group's runs, and the paper's number."""
    rows = []
    for label, members in groups.items():
        params = next((r.params for r in members if "paper.metric" in r.params), None)
        if params is None:
            continue
        metric = params["paper.metric"]
        values = [r.final[metric] for r in members if metric in r.final]
        mean, std = mean_std(values) if values else (None, None)
        rows.append({"group": label, "metric": metric, "mean": mean, "std": std, "n": len(values),
                     "paper": _paper_value(params.get("paper.value")),
                     "source": params.get("paper.citation", ""), "table": params.get("paper.table", ""),
                     "note": params.get("paper.note", "")})
    return rows


def paper_html(groups: dict[str, list[RunData]]) -> str:
    """The 'measured vs paper' table, or "" when no compared run has a paper block."""
    rows = paper_rows(groups)
    if not rows:
        return ""
    head = ["group", "metric", "measured (mean ± std)", "seeds", "paper", "source", "note"]
    out = [("<section><h2>Measured vs paper (presets with a paper block)</h2>"
            "<table class='sortable' id='paper'><thead><tr>")]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        measured = ("" if row["mean"] is None
                    else f"{_fmt(float(row['mean']))} ± {_fmt(float(row['std']))}")
        paper = "unverified" if row["paper"] is None else _fmt(row["paper"])
        source = f"{row['source']} ({row['table']})" if row["table"] else row["source"]
        cells = [row["group"], row["metric"]]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                   + f"<td class='num measured'>{html.escape(measured)}</td>"
                   + f"<td class='num'>{row['n']}</td>"
                   + f"<td class='num paper'>{html.escape(paper)}</td>"
                   + f"<td>{html.escape(source)}</td><td>{html.escape(row['note'])}</td></tr>")
    out.append("</tbody></table></section>")
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
    sections.append(paper_html(groups))
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


def default_page_name(experiment: str) -> str:
    """``compare-<experiment>.html`` in the current folder. The name comes from the store (on a
    shared server anyone picks it): every character but letters, digits, ``_``, ``-`` and ``.``
    becomes ``_``, so ``a/../../x`` cannot reach another folder; leading dots are dropped."""
    safe = re.sub(r"[^\w.-]+", "_", experiment).lstrip(".") or "experiment"
    return f"compare-{safe[:150]}.html"


def _write_page(out: Path, text: str) -> None:
    """Write the page; an --out that cannot be a file is the user's to fix (exit 2)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'compare.html'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the folder {out.parent} "
                          f"({exc.strerror or exc}); choose a folder you can write") from None
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the file ({exc.strerror or exc})") from None


def write_compare(tracking_uri: str | None = None, experiment: str | None = None,
                  run_ids: list[str] | None = None, out: str | Path | None = None,
                  title: str | None = None, log_to: str | None = "auto") -> ComparePage:
    """Query MLflow, write the page to ``out`` and (for a sweep) log it on the parent run.

    log_to: a run id, ``"auto"`` (the seeds/sweep parent shared by every compared run, if
    any) or None.
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
    out = Path(out).expanduser() if out else Path(default_page_name(name))
    _write_page(out, render_page(runs, title, f"experiment '{name}' at {uri}"))
    parent = None
    if log_to == "auto":
        parents = {T.group_parent(r.tags) for r in runs}
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
        text += f"; logged as artifact compare.html of parent run {page.logged_to}"
    return text


__all__ = ["write_compare", "render_page", "select_runs", "load_runs", "group_runs", "curve",
           "accuracy_matrix", "mean_std", "ComparePage", "RunData", "page_summary", "paper_rows",
           "fig_unlearning", "fig_llm_unlearning"]
