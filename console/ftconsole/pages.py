"""HTML of every console page: pure functions from data to text.

Every piece of data -- names, status messages, prompts, model responses -- goes through ``esc``
(``html.escape`` with quotes) before it reaches the page, and the pages carry no inline script
(the Content-Security-Policy forbids it), so a response holding ``<script>`` renders as text.
Plots are inline SVG computed here; ``static/console.js`` only refreshes fragments, filters
samples and sends labels.
"""

from __future__ import annotations

import html
from typing import Any, Iterable
from urllib.parse import quote

from ftconsole.history import History, Pair, Series

STAGE_ORDER = ("sft", "reward", "ppo", "grpo", "dpo")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.{digits}g}"


def run_path(namespace: str, name: str, suffix: str = "") -> str:
    return f"/runs/{quote(namespace, safe='')}/{quote(name, safe='')}{suffix}"


def layout(*, title: str, body: str, user: str | None = None) -> str:
    who = (f'<span class="user">{esc(user)}</span> <a href="/logout">log out</a>' if user else "")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · finetune console</title>"
        '<link rel=stylesheet href="/static/console.css"><script src="/static/console.js" defer></script>'
        "</head><body>"
        f'<header><a class=brand href="/">finetune console</a><nav>{who}</nav></header>'
        f"<main>{body}</main></body></html>"
    )


def login_page(*, error: str | None = None) -> str:
    note = f'<p class="error">{esc(error)}</p>' if error else ""
    body = (
        "<h1>Log in</h1>"
        "<p>Paste a Kubernetes bearer token: the console checks it with TokenReview and asks the "
        "cluster (SubjectAccessReview) before every read and label, so your RBAC decides what you see. "
        "For example <code>kubectl create token &lt;serviceaccount&gt;</code>, or your OIDC id-token.</p>"
        f"{note}"
        '<form method=post action="/login"><label>Token <input type=password name=token autocomplete=off '
        'required autofocus></label> <button type=submit>Log in</button></form>'
    )
    return layout(title="Log in", body=body)


def error_page(*, status: int, message: str, user: str | None = None) -> str:
    return layout(title=str(status), user=user,
                  body=f'<h1>{status}</h1><p class="error" id="error">{esc(message)}</p><p><a href="/">Runs</a></p>')


# ----------------------------------------------------------------------------- runs


def _status(run: dict[str, Any]) -> dict[str, Any]:
    status = run.get("status")
    return status if isinstance(status, dict) else {}


def runs_table(runs: list[dict[str, Any]], *, hidden_namespaces: int = 0) -> str:
    """The live part of the runs page: one row per run, newest first within a namespace."""
    rows = []
    for run in runs:
        meta, status = run.get("metadata") or {}, _status(run)
        state = status.get("state") or "Pending"
        shown = esc(state)
        waiting = [r for r in status.get("feedbackRounds") or [] if isinstance(r, dict)
                   and r.get("state") == "AwaitingLabels"]
        if state == "AwaitingFeedback" and waiting:  # the count people act on, and where to label
            label_path = run_path(meta.get("namespace", ""), meta.get("name", "")) + "/label"
            shown += (f' <a class="feedback-count" href="{esc(label_path)}">{esc(waiting[-1].get("labels", 0))}/'
                      f'{esc(waiting[-1].get("needed"))} labels</a>')
        rows.append(
            f'<tr class="run" data-state="{esc(state)}">'
            f'<td>{esc(meta.get("namespace"))}</td>'
            f'<td><a href="{esc(run_path(meta.get("namespace", ""), meta.get("name", "")))}">{esc(meta.get("name"))}</a></td>'
            f'<td><span class="state state-{esc(state)}">{shown}</span></td>'
            f'<td>{esc(status.get("currentStage"))}</td><td>{esc(status.get("progress"))}</td>'
            f'<td class=num>{_num(status.get("reward"))}</td><td class=num>{_num(status.get("kl"))}</td>'
            f'<td>{esc(meta.get("creationTimestamp"))}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan=8 class="empty">No runs you may read.</td></tr>')
    note = (f'<p class="note">{hidden_namespaces} namespace(s) with runs you may not list are not shown.</p>'
            if hidden_namespaces else "")
    return (
        '<table class="runs"><thead><tr><th>Namespace</th><th>Run</th><th>State</th><th>Stage</th>'
        "<th>Progress</th><th>Reward</th><th>KL</th><th>Created</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{note}")


def runs_page(runs: list[dict[str, Any]], *, user: str, hidden_namespaces: int = 0) -> str:
    body = ("<h1>Runs</h1>"
            f'<div id="runs" data-refresh="/fragment/runs">{runs_table(runs, hidden_namespaces=hidden_namespaces)}</div>')
    return layout(title="Runs", body=body, user=user)


# ----------------------------------------------------------------------------- plots


def svg_plot(series: Series, *, width: int = 300, height: int = 120) -> str:
    """A line of the series' values per step, with a band from each point's min to max (downsampled
    points stand for several steps), axis ranges written at the corners."""
    pad_left, pad_right, pad_top, pad_bottom = 4, 4, 16, 14
    steps, values = series.steps, series.values
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(series.low), max(series.high)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom

    def x(step: float) -> float:
        return pad_left + (step - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return pad_top + (1 - (value - y0) / (y1 - y0)) * plot_h

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values))
    band = ""
    if any(lo != hi for lo, hi in zip(series.low, series.high)):
        upper = [f"{x(s):.1f},{y(h):.1f}" for s, h in zip(steps, series.high)]
        lower = [f"{x(s):.1f},{y(lo):.1f}" for s, lo in zip(reversed(steps), reversed(series.low))]
        band = f'<polygon class="band" points="{" ".join(upper + lower)}"/>'
    dot = f'<circle class="last" cx="{x(steps[-1]):.1f}" cy="{y(values[-1]):.1f}" r="2.5"/>' if len(steps) == 1 else ""
    return (
        f'<figure class="plot" data-metric="{esc(series.name)}">'
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(series.name)} per step">'
        f'<text class="title" x="{pad_left}" y="11">{esc(series.name)} = {_num(values[-1])}</text>'
        f'<text class="axis" x="{width - pad_right}" y="11" text-anchor="end">{_num(y1, 3)}</text>'
        f'<text class="axis" x="{width - pad_right}" y="{height - 2}" text-anchor="end">step {steps[-1]}</text>'
        f'<text class="axis" x="{pad_left}" y="{height - 2}">{_num(y0, 3)} · step {steps[0]}</text>'
        f'<rect class="frame" x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}"/>'
        f'{band}<polyline class="line" points="{line}"/>{dot}</svg></figure>')


# ----------------------------------------------------------------------------- a run


def _ordered_stages(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))


def timeline(run: dict[str, Any], history: History) -> str:
    """Stages in order with their state, attempts, times and reasons (status), the trainer's stage
    events (history), then the run's conditions."""
    status = _status(run)
    stages = status.get("stages") if isinstance(status.get("stages"), dict) else {}
    items = []
    for name in _ordered_stages([*stages, *history.stages]):
        entry = stages.get(name) if isinstance(stages.get(name), dict) else {}
        state = entry.get("state") or "–"
        facts = []
        for key, label in (("attempts", "attempts"), ("failures", "failures"), ("disruptions", "disruptions")):
            if entry.get(key):
                facts.append(f"{label} {esc(entry[key])}")
        for key, label in (("startTime", "started"), ("runningTime", "running"), ("completionTime", "finished")):
            if entry.get(key):
                facts.append(f"{label} <time>{esc(entry[key])}</time>")
        if entry.get("step") is not None:
            facts.append(f"step {esc(entry.get('step'))}/{esc(entry.get('totalSteps') or '?')}")
        detail = ""
        if entry.get("reason") or entry.get("message"):
            detail += f'<p class="reason"><b>{esc(entry.get("reason"))}</b> {esc(entry.get("message"))}</p>'
        failure = entry.get("lastFailure")
        if isinstance(failure, dict):
            detail += ('<p class="reason failure">last failure: '
                       + esc(", ".join(f"{k}={v}" for k, v in failure.items())) + "</p>")
        events = history.stages.get(name).events if name in history.stages else []
        if events:
            detail += '<ol class="events">' + "".join(
                f'<li><time>{esc(e.get("time"))}</time> {esc(e.get("kind"))} at step {esc(e.get("step"))}'
                + (f' — {esc(e.get("reason"))}' if e.get("reason") else "") + "</li>" for e in events) + "</ol>"
        items.append(f'<li class="stage"><span class="state state-{esc(state)}">{esc(state)}</span> '
                     f'<b>{esc(name)}</b> <span class="facts">{" · ".join(facts)}</span>{detail}</li>')
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    cond_rows = "".join(
        f'<tr><td>{esc(c.get("type"))}</td><td>{esc(c.get("status"))}</td><td>{esc(c.get("reason"))}</td>'
        f'<td>{esc(c.get("message"))}</td><td>{esc(c.get("lastTransitionTime"))}</td></tr>' for c in conditions)
    return (f'<ol class="timeline">{"".join(items) or "<li>No stage has started.</li>"}</ol>'
            + (f'<details><summary>Conditions</summary><table class="conditions"><tr><th>Type</th><th>Status</th>'
               f'<th>Reason</th><th>Message</th><th>Since</th></tr>{cond_rows}</table></details>' if cond_rows else ""))


def plots(history: History) -> str:
    parts = []
    for stage in _ordered_stages(history.stages):
        series = history.stages[stage].series
        if series:
            parts.append(f'<h3>{esc(stage)}</h3><div class="plots">'
                         + "".join(svg_plot(s) for s in series) + "</div>")
    return "".join(parts) or '<p class="empty">No metric history yet (the trainer writes it every 10 s).</p>'


def samples_table(samples: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr class="sample"><td>{esc(s["stage"])}</td><td class=num>{esc(s["step"])}</td>'
        f'<td class="text">{esc(s["prompt"])}</td><td class="text">{esc(s["response"])}</td>'
        f'<td class=num>{_num(s.get("reward"))}</td><td class=num>{_num(s.get("kl"))}</td></tr>'
        for s in reversed(samples))
    if not rows:
        return '<p class="empty">No samples yet.</p>'
    return ('<table class="samples"><thead><tr><th>Stage</th><th>Step</th><th>Prompt</th><th>Response</th>'
            f"<th>Reward</th><th>KL</th></tr></thead><tbody>{rows}</tbody></table>")


def run_live(run: dict[str, Any], history: History) -> str:
    """The part of a run's page that refreshes: summary, timeline, plots."""
    status = _status(run)
    state = status.get("state") or "Pending"
    summary = (f'<p class="summary"><span class="state state-{esc(state)}">{esc(state)}</span> '
               f'{esc(status.get("progress"))} · reward {_num(status.get("reward"))} · KL {_num(status.get("kl"))}'
               + (f' — {esc(status.get("message"))}' if status.get("message") else "") + "</p>")
    return (summary + "<h2>Timeline</h2>" + timeline(run, history)
            + "<h2>Metrics per step</h2>" + plots(history))


def run_page(run: dict[str, Any], history: History, *, user: str, label_count: int | None) -> str:
    meta = run.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    labels = (f' · <a href="{esc(run_path(namespace, name, "/label"))}">label samples</a>'
              + (f" ({label_count} labels)" if label_count is not None else ""))
    samples = history.samples or [s for s in _status(run).get("samples") or [] if isinstance(s, dict)]
    samples = [{"stage": s.get("stage"), "step": s.get("step"), "prompt": s.get("prompt") or "",
                "response": s.get("response") or "", "reward": s.get("reward"), "kl": s.get("kl")} for s in samples]
    body = (
        f'<h1>{esc(name)} <small>{esc(namespace)}</small></h1><p><a href="/">All runs</a>{labels}</p>'
        f'<div id="live" data-refresh="{esc(run_path(namespace, name, "/fragment"))}">{run_live(run, history)}</div>'
        "<h2>Samples over time</h2>"
        '<input id="sample-search" type=search placeholder="Search prompts and responses" autocomplete=off>'
        f' <span id="sample-count"></span>{samples_table(samples)}')
    return layout(title=name, body=body, user=user)


# ----------------------------------------------------------------------------- labelling


def label_page(*, namespace: str, run: str, pairs: list[Pair], existing: int, user: str,
               round_: int | None = None, counted: int | None = None, needed: int | None = None) -> str:
    """One pair at a time (JS shows the next after each label); keys 1 A, 2 B, t tie, b both bad,
    s skip. Each pair's texts are escaped into the page; the script reads them as text.

    ``round_``: the open human-feedback round whose candidates ``pairs`` are; its labels carry that round
    number, and ``counted`` of ``needed`` labels (A or B) are shown."""
    sections = "".join(
        f'<section class="pair" data-index="{i}" hidden>'
        f'<h2>Prompt</h2><pre class="prompt">{esc(p.prompt)}</pre>'
        '<div class="candidates">'
        f'<div class="candidate" data-choice="a" data-source="{esc(p.source_a)}"><h3>A <small>(1)</small></h3>'
        f'<pre class="response">{esc(p.a)}</pre></div>'
        f'<div class="candidate" data-choice="b" data-source="{esc(p.source_b)}"><h3>B <small>(2)</small></h3>'
        f'<pre class="response">{esc(p.b)}</pre></div></div></section>'
        for i, p in enumerate(pairs))
    if not pairs:
        sections = ('<p class="empty" id="no-pairs">Nothing to label yet: pairs appear once a prompt has been '
                    "answered at two steps with different text.</p>")
    heading = f'<h1>Label {esc(run)} <small>{esc(namespace)}</small></h1>'
    if round_ is not None:
        heading += (f'<p class="round" id="feedback-round">Human-feedback round {round_}: '
                    f'<span id="round-count">{counted}/{needed}</span> labels that prefer A or B; the run continues '
                    "once enough exist.</p>")
    body = (
        f'{heading}'
        f'<p><a href="{esc(run_path(namespace, run))}">Back to the run</a> · '
        f'<span id="label-progress" data-existing="{existing}" data-total="{len(pairs)}">'
        f'{existing} labels so far</span> · <span id="pair-position"></span></p>'
        f'<div id="labelling" data-namespace="{esc(namespace)}" data-run="{esc(run)}" '
        f'data-round="{round_ or 0}">{sections}</div>'
        '<p class="keys"><kbd>1</kbd> A is better · <kbd>2</kbd> B is better · <kbd>t</kbd> tie · '
        '<kbd>b</kbd> both bad · <kbd>s</kbd> skip</p><p id="label-status" role="status"></p>')
    return layout(title=f"Label {run}", body=body, user=user)
