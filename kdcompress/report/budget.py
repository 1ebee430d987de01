"""The budget a pruned stage was held to (``prune.budget``), for report.json, the terminal, Markdown and HTML.

:func:`budget_block` reads the ``budget`` record the pruned stage left in its checkpoint's metrics
(:func:`kdcompress.run.budget.budget_record`). A checkpoint is data: every field is checked, and a record
that is not what kdc writes gives no block. The renderers take the report's ``budget`` block:
:func:`budget_lines` (terminal and Markdown), :func:`budget_html` (a section of report.html) and
:func:`budget_warnings` (reached more than 3 % over the target).
"""

from __future__ import annotations

import math
from html import escape

__all__ = ["budget_block", "budget_lines", "budget_html", "budget_warnings", "BUDGET_KINDS"]

BUDGET_KINDS = ("macs", "params", "bytes", "latency_ms", "latency")
_NUMBERS = ("value", "target", "reference", "reached", "predicted")
_MAX_GROUPS = 10_000
_TEXT = 300


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def budget_block(pruned_checkpoint: dict | None) -> dict | None:
    """The ``budget`` block of report.json from the pruned stage's checkpoint, or None (no budget, or a record
    that is not what kdc writes). Keys: kind, value, target, reference, reached, ratio_to_target,
    ratio_to_reference, predicted, predicted_drop, method, round_to, how_measured, allocation ({group: share
    removed}), kept ({group: channels kept}), over, tolerance."""
    metrics = (pruned_checkpoint or {}).get("metrics")
    record = metrics.get("budget") if isinstance(metrics, dict) else None
    if not isinstance(record, dict) or record.get("kind") not in BUDGET_KINDS:
        return None
    numbers = {k: _number(record.get(k)) for k in _NUMBERS}
    if any(numbers[k] is None for k in ("target", "reference", "reached")) or numbers["target"] <= 0:
        return None
    allocation, kept = record.get("allocation"), record.get("kept")
    shares = (
        {str(k)[:_TEXT]: float(v) for k, v in allocation.items() if _number(v) is not None and 0 <= v < 1}
        if isinstance(allocation, dict) and len(allocation) <= _MAX_GROUPS
        else {}
    )
    channels = (
        {str(k)[:_TEXT]: int(v) for k, v in kept.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
        if isinstance(kept, dict) and len(kept) <= _MAX_GROUPS
        else {}
    )
    tolerance = _number(record.get("tolerance"))
    tolerance = tolerance if tolerance is not None and 0 <= tolerance < 1 else 0.03
    round_to = record.get("round_to")
    return {
        "kind": record["kind"],
        **numbers,
        "ratio_to_target": numbers["reached"] / numbers["target"],
        "ratio_to_reference": numbers["reached"] / numbers["reference"] if numbers["reference"] > 0 else None,
        "predicted_drop": _number(record.get("predicted_drop")),
        "method": record.get("method") if record.get("method") in ("uniform", "sensitivity") else None,
        "round_to": round_to if isinstance(round_to, int) and not isinstance(round_to, bool) else None,
        "how_measured": str(record.get("how_measured") or "")[:_TEXT] or None,
        "allocation": shares,
        "kept": channels,
        "tolerance": tolerance,
        "over": numbers["reached"] > (1.0 + tolerance) * numbers["target"],
    }


def _amount(kind: str, value: float) -> str:
    return f"{value:,.3g} ms" if kind in ("latency_ms", "latency") else f"{value:,.0f}"


def _shares(b: dict) -> str:
    return ", ".join(
        f"{root} {share:.0%}" + (f" ({b['kept'][root]} kept)" if root in b["kept"] else "")
        for root, share in b["allocation"].items()
    )


def budget_lines(report: dict) -> list[str]:
    """The budget in plain lines (terminal, Markdown): budget and target, reached, allocation, how measured."""
    b = report.get("budget")
    if not isinstance(b, dict):
        return []
    kind = b["kind"]
    asked = f"{b['value']:g} of the distilled student" if (b.get("value") or 2) <= 1 else _amount(kind, b["value"])
    of_ref = f", {b['ratio_to_reference']:.1%} of the distilled student's" if b.get("ratio_to_reference") else ""
    drop = f"; predicted drop {b['predicted_drop']:.2f} points" if b.get("predicted_drop") is not None else ""
    return [
        f"budget: {kind} {asked}, target {_amount(kind, b['target'])}; reached {_amount(kind, b['reached'])} "
        f"({b['ratio_to_target']:.1%} of the target{of_ref})" + (" OVER THE BUDGET" if b["over"] else ""),
        f"allocation ({b.get('method') or 'unknown'}"
        + (f", round_to {b['round_to']}" if b.get("round_to") else "")
        + f"): {_shares(b) or 'not recorded'}{drop}",
        f"measured: {b.get('how_measured') or 'not recorded'}",
    ]


def budget_html(report: dict) -> str | None:
    """A ``<section id="budget">`` for report.html, or None without a budget."""
    b = report.get("budget")
    if not isinstance(b, dict):
        return None
    kind = b["kind"]
    rows = [
        ("budget", f"{kind} {b['value']:g}" if b.get("value") is not None else kind),
        ("target", _amount(kind, b["target"])),
        ("reached", f"{_amount(kind, b['reached'])} ({b['ratio_to_target']:.1%} of the target)"),
        ("the distilled student", _amount(kind, b["reference"])),
        (
            "allocation",
            f"{b.get('method') or 'unknown'}" + (f", round_to {b['round_to']}" if b.get("round_to") else ""),
        ),
        ("how measured", b.get("how_measured") or "not recorded"),
    ]
    head = "".join(f"<tr><th class=l>{escape(k)}</th><td class=l>{escape(str(v))}</td></tr>" for k, v in rows)
    groups = "".join(
        f"<tr><td class=l>{escape(root)}</td><td>{share:.1%}</td><td>{escape(str(b['kept'].get(root, '')))}</td></tr>"
        for root, share in b["allocation"].items()
    )
    warn = '<p class="note"><strong>Over the budget.</strong></p>' if b["over"] else ""
    return (
        '<section id="budget"><h2>Budget</h2>'
        f'<div class="scroll"><table><tbody>{head}</tbody></table></div>{warn}'
        '<div class="scroll"><table><thead><tr><th class=l>group</th><th>removed</th><th>channels kept</th></tr>'
        f"</thead><tbody>{groups}</tbody></table></div></section>"
    )


def budget_warnings(report: dict) -> list[str]:
    """A warning when the pruned model costs more than the tolerance over its budget's target."""
    b = report.get("budget")
    if not isinstance(b, dict) or not b.get("over"):
        return []
    return [
        f"the pruned stage reached {_amount(b['kind'], b['reached'])} {b['kind']}, {b['ratio_to_target']:.1%} of its "
        f"budget's target {_amount(b['kind'], b['target'])}: more than {b['tolerance']:.0%} over; lower the budget "
        f"or set prune.round_to lower, then rerun kdc prune"
    ]
