"""The site validation's HTML report: one self-contained file (plots embedded as base64 PNG, no script, no link
outside it) that a radiology lead can read: what was measured on which studies, how sure the figures are, what
the model card claimed, and the proposed operating point.

Input: :func:`inference.site_validation.validate_cases`' result and the facts around it (model files, period).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from inference.site_validation import small_n_warnings
from inference.statistics import format_ci, format_number, roc_curve

__all__ = ["render_report"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(result: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    y = np.asarray(result["curve"]["label"], dtype=int)
    p = np.asarray(result["curve"]["score"], dtype=np.float64)
    out = {}
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {format_number(result['overall']['roc_auc'])}")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    o = result["overall"]
    if o["specificity"] is not None and o["sensitivity"] is not None:
        ax.plot([1 - o["specificity"]], [o["sensitivity"]], "o", color="red", label="node's operating point")
    ax.set(xlabel="1 - specificity (false alarms among normals)", ylabel="sensitivity", title="ROC curve")
    ax.legend(loc="lower right")
    out["roc"] = _png(fig)

    bins = np.linspace(0, 1, 6)
    idx = np.clip(np.digitize(p, bins) - 1, 0, len(bins) - 2)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    xs, ys, ns = [], [], []
    for b in range(len(bins) - 1):
        m = idx == b
        if m.any():
            xs.append(float(p[m].mean()))
            ys.append(float(y[m].mean()))
            ns.append(int(m.sum()))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot(xs, ys, "o-", label="this site")
    for x, v, n in zip(xs, ys, ns):
        ax.annotate(f"n={n}", (x, v), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="P(abnormal) the node gave", ylabel="fraction truly abnormal")
    ax.set_title("Calibration (reliability)")
    ax.legend(loc="upper left")
    out["calibration"] = _png(fig)

    (tn, fp), (fn, tp) = o["confusion"]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    grid = np.asarray([[tn, fp], [fn, tp]])
    ax.imshow(grid, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(grid[i, j]), ha="center", va="center", fontsize=16, color="black")
    ax.set_xticks([0, 1], ["AI: no abnormality", "AI: abnormal"])
    ax.set_yticks([0, 1], ["truth: normal", "truth: abnormal"])
    ax.set_title("Confusion matrix at the node's operating point")
    out["confusion"] = _png(fig)
    return out


def _e(v: Any) -> str:
    return html.escape(str(v))


def _row(name: str, m: dict) -> str:
    return (
        f"<tr><td>{_e(name)}</td><td>{m['n']}</td><td>{m['positives']}</td><td>{m['negatives']}</td>"
        f"<td>{format_number(m['roc_auc'])} {format_ci(m['roc_auc_ci95'])}</td>"
        f"<td>{format_number(m['sensitivity'])} {format_ci(m['sensitivity_ci95'])}</td>"
        f"<td>{format_number(m['specificity'])} {format_ci(m['specificity_ci95'])}</td></tr>"
    )


HEAD = (
    "<tr><th>group</th><th>n</th><th>abnormal</th><th>normal</th><th>AUC [95 % CI]</th>"
    "<th>sensitivity [95 % CI]</th><th>specificity [95 % CI]</th></tr>"
)

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:.25em .5em;text-align:left}
th{background:#eee}.warn{background:#fff3cd;border:1px solid #e0c36b;padding:.5em 1em}.figs img{max-width:32%}
code{font-size:90%}.small{font-size:85%;color:#555}
"""


def render_report(
    result: dict[str, Any],
    *,
    validation_id: int | None,
    created: str,
    models: list[dict[str, Any]],
    card: dict[str, Any] | None,
    period: str,
    calibration_path: str = "",
    in_force: str = "",
) -> str:
    """The report as one HTML document."""
    plots = _plots(result)
    o = result["overall"]
    warnings = small_n_warnings(result)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Site validation {validation_id or ''} - dicom-node</title><style>{STYLE}</style></head><body>",
        f"<h1>Site validation{f' #{validation_id}' if validation_id else ''}</h1>",
        f"<p>Made {_e(created)} over <b>{o['n']} studies</b> ({o['positives']} abnormal, {o['negatives']} normal) "
        f"of this site with ground truth, {_e(period)}. AI results are not for primary diagnosis.</p>",
        "<h2>In short</h2><ul>",
        f"<li>The AI told abnormal from normal studies with an AUC of <b>{format_number(o['roc_auc'])}</b> "
        f"(95 % CI {format_ci(o['roc_auc_ci95'])}; 0.5 is a coin toss, 1.0 perfect).</li>",
        f"<li>At the operating point the node uses now, it flagged {o['confusion'][1][1]} of {o['positives']} "
        f"abnormal studies (sensitivity <b>{format_number(o['sensitivity'])}</b> {format_ci(o['sensitivity_ci95'])}) "
        f"and called {o['confusion'][0][0]} of {o['negatives']} normal studies normal (specificity "
        f"<b>{format_number(o['specificity'])}</b> {format_ci(o['specificity_ci95'])}).</li>",
        f"<li>It missed {o['false_negatives']} abnormal studies and raised {o['false_positives']} false alarms.</li>",
        "</ul>",
    ]
    if warnings:
        parts.append("<div class='warn'><b>Small numbers.</b><ul>")
        parts += [f"<li>{_e(w)}</li>" for w in warnings]
        parts.append("</ul></div>")
    parts += [
        "<h2>What the intervals mean</h2>",
        "<p>Each figure comes with a 95 % confidence interval [low-high]: the range of values that agree with "
        "what was seen on this many studies. With other studies from the same site the figure would vary by about "
        "that much. A wide interval means too few studies to be sure; two groups whose intervals overlap widely "
        "may not really differ. AUC intervals are DeLong's, sensitivity and specificity intervals Wilson's.</p>",
        "<h2>Plots</h2><div class='figs'>",
        f"<img alt='ROC curve' src='data:image/png;base64,{plots['roc']}'>",
        f"<img alt='Calibration plot' src='data:image/png;base64,{plots['calibration']}'>",
        f"<img alt='Confusion matrix' src='data:image/png;base64,{plots['confusion']}'>",
        "</div>",
        "<p class='small'>ROC curve: every possible threshold, sensitivity against false alarms; the red dot is "
        "the node's. Calibration: studies grouped by the P(abnormal) the node gave; on the diagonal, that "
        "probability matches how often such studies were truly abnormal (the node's P(abnormal) is mapped so "
        "that 0.5 is its operating point, so it is not expected to lie on the diagonal).</p>",
        "<h2>Figures</h2><table border='1' cellpadding='4'>",
        HEAD,
        _row("all studies", o),
        "</table>",
    ]
    for title, key in (("view", "per_view"), ("device", "per_device"), ("month", "per_month")):
        parts += [f"<h3>Per {title}</h3><table border='1' cellpadding='4'>", HEAD]
        parts += [_row(name, m) for name, m in result[key].items()]
        parts.append("</table>")
    parts += ["<h3>Retrospective (pulled from the archive) and live</h3><table border='1' cellpadding='4'>", HEAD]
    parts += [_row(name, m) for name, m in result["per_phase"].items()]
    parts.append("</table>")
    parts.append("<h2>Beside the model card</h2>")
    if card:
        c = card["overall"]
        parts += [
            f"<p>What the classifier file says about itself, measured on its own {_e(card['split'])} "
            f"({_e(card.get('training_data') or 'its training data')}):</p><table border='1' cellpadding='4'>",
            "<tr><th>set</th><th>n</th><th>AUC</th><th>sensitivity</th><th>specificity</th></tr>",
            f"<tr><td>model card, overall</td><td>{_e(c.get('n') or 'n/a')}</td><td>{format_number(c.get('roc_auc'))}"
            f"</td><td>{format_number(c.get('sensitivity'))}</td><td>{format_number(c.get('specificity'))}</td></tr>",
        ]
        for view, m in card["per_view"].items():
            parts.append(
                f"<tr><td>model card, view {_e(view)}</td><td>{_e(m.get('n') or 'n/a')}</td>"
                f"<td>{format_number(m.get('roc_auc'))}</td><td>{format_number(m.get('sensitivity'))}</td>"
                f"<td>{format_number(m.get('specificity'))}</td></tr>"
            )
        parts.append(
            f"<tr><td><b>this site</b></td><td>{o['n']}</td><td>{format_number(o['roc_auc'])}</td>"
            f"<td>{format_number(o['sensitivity'])}</td><td>{format_number(o['specificity'])}</td></tr></table>"
        )
        parts.append(
            "<p>A site figure well below the model card's means the model does not transfer as well to this "
            "site's patients, devices or processing as its own test suggested.</p>"
        )
    else:
        parts.append("<p>The classifier file states no held-out figures of its own.</p>")
    parts.append("<h2>Proposed operating point</h2>")
    cal = result.get("calibration")
    if cal:
        m = cal["metrics"]["overall"]
        parts += [
            f"<p>To reach a sensitivity of {cal['target_sensitivity']} on these studies, the classifier's raw "
            f"probability threshold would be <b>{cal['default']:.4f}</b>"
            + (
                " with, per view: "
                + ", ".join(f"{_e(v)} {t:.4f}" for v, t in sorted(cal["per_view"].items()))
                + " (views with at least 10 normal and 10 abnormal studies get their own)"
                if cal["per_view"]
                else " for every view (no view had 10 normal and 10 abnormal studies of its own)"
            )
            + f". On these studies it would have given sensitivity {format_number(m['sensitivity'])} "
            f"{format_ci(m['sensitivity_ci95'])} and specificity {format_number(m['specificity'])} "
            f"{format_ci(m['specificity_ci95'])}.</p>",
            "<p>A threshold chosen on a set reaches its target on that set by construction; on new studies "
            "it will do somewhat worse. Validate again after a few weeks of silent running.</p>",
        ]
        if calibration_path:
            parts.append(
                f"<p>Written to <code>{_e(calibration_path)}</code>. To use it, set "
                f"<code>inference.models.calibration: {_e(calibration_path)}</code> in config.yaml and restart "
                "the node.</p>"
            )
    if result.get("calibration_problem"):
        parts.append(f"<p>{_e(result['calibration_problem'])}</p>")
    parts += ["<h2>Models and data</h2><table border='1' cellpadding='4'>"]
    for m in models:
        parts.append(
            f"<tr><th>{_e(m.get('role', ''))}</th><td>{_e(m.get('name', ''))} {_e(m.get('architecture', ''))} "
            f"{_e(m.get('version', ''))}</td><td><code>{_e(m.get('sha256', ''))}</code></td></tr>"
        )
    parts += [
        f"<tr><th>calibration in force</th><td colspan='2'>{_e(in_force or 'none (the model file operating point)')}"
        "</td></tr>",
        f"<tr><th>period</th><td colspan='2'>{_e(period)}</td></tr>",
        f"<tr><th>studies</th><td colspan='2'>{o['n']}</td></tr></table>",
        "<p class='small'>A study's score is the highest P(abnormal) over its analysable images; only results "
        "made by exactly these model files count. A new model file has no validation until it gets its own.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)
