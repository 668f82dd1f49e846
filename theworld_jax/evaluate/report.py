"""report.json per model (accuracy, n and Wilson 95 % interval, overall and per task) and report.md
side by side for the compared models."""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Sequence

from theworld_jax.evaluate import scoring
from theworld_jax.evaluate.data import Item


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """The Wilson score interval [lo, hi] of k successes in n trials ([0, 1] when n is 0)."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summary(flags: Sequence[bool]) -> dict:
    """{"accuracy", "n", "ci95"} of a list of right/wrong flags (accuracy None when empty)."""
    n, k = len(flags), sum(bool(f) for f in flags)
    return {"accuracy": k / n if n else None, "n": n, "ci95": wilson(k, n)}


def _by_task(pairs: Sequence[tuple[str, bool]]) -> dict:
    tasks = collections.defaultdict(list)
    for task, flag in pairs:
        tasks[task].append(flag)
    return {t: summary(tasks[t]) for t in sorted(tasks)}


def build_report(items: Sequence[Item], predictions: dict, judgments: dict | None = None, *,
                 info: dict | None = None) -> dict:
    """The report of one model: `predictions` / `judgments` map id -> the logged row."""
    judgments = judgments or {}
    by_id = {it.id: it for it in items}
    bad = [r for r in predictions.values() if "bad" in r]
    scored, judged, quantities, unparsed, pending = [], [], [], 0, 0
    for it in items:
        row = predictions.get(it.id)
        if row is None or "bad" in row:
            pending += row is None
            continue
        if it.kind == "judge":
            if it.id in judgments:
                judged.append((it.task, bool(judgments[it.id]["correct"])))
            continue
        scored.append((it.task, bool(row["correct"])))
        unparsed += row.get("parsed") is None
        if it.kind == "quantity":
            quantities.append(row)
    report = dict(info or {})
    report["overall"] = summary([f for _, f in scored])
    report["tasks"] = _by_task(scored)
    report["rows"] = {"total": len(items) + sum(r["id"] not in by_id for r in bad), "scored": len(scored),
                      "judged": len(judged), "bad": len(bad), "pending": pending, "unparsed": unparsed}
    report["bad_rows"] = dict(sorted(collections.Counter(r["bad"] for r in bad).items()))
    if quantities:
        errors = [q.get("relative_error") for q in quantities]
        metres = [e for q, e in zip(quantities, errors) if e is not None and q.get("unit") == "metres"]
        report["quantitative"] = {
            "n": len(quantities),
            "success": {f"{round(t * 100)}%": sum(e is not None and e <= t for e in errors) / len(errors)
                        for t in scoring.THRESHOLDS},
            "unparseable": sum(e is None for e in errors),
            "mean_relative_error": sum(metres) / len(metres) if metres else None,
        }
    n_judge = sum(it.kind == "judge" and "prediction" in predictions.get(it.id, {}) for it in items)
    if n_judge:
        report["qualitative"] = {"n": n_judge, "judged": len(judged),
                                 "overall": summary([f for _, f in judged]), "tasks": _by_task(judged)}
    return report


def write_text(path: str, text: str | bytes) -> None:
    """Write a file of this tool's own through a temporary sibling and a rename (never half written)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _cell(s: dict | None) -> str:
    if not s or s["accuracy"] is None:
        return "-"
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def _delta(a: dict | None, b: dict | None) -> str:
    if not a or not b or a["accuracy"] is None or b["accuracy"] is None:
        return "-"
    return f"{100 * (a['accuracy'] - b['accuracy']):+.1f}"


def _table(reports: dict, section: str | None) -> list[str]:
    names = list(reports)
    parts = [reports[n] if section is None else reports[n].get(section, {}) for n in names]
    head = ["task"] + names + ([f"{names[0]} - {names[1]}"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tasks = sorted({t for p in parts for t in p.get("tasks", {})})
    for task, get in [("**overall**", lambda p: p.get("overall"))] + [
            (t, lambda p, t=t: p.get("tasks", {}).get(t)) for t in tasks]:
        cells = [_cell(get(p)) for p in parts]
        if len(names) == 2:
            cells.append(_delta(get(parts[0]), get(parts[1])))
        lines.append("| " + " | ".join([task] + cells) + " |")
    return lines


def markdown(reports: dict) -> str:
    """report.md: accuracy % [95 % interval] (n) per task for each model, side by side."""
    lines = ["# Evaluation", ""]
    for name, r in reports.items():
        world = "world on" if r.get("world") else "world off"
        lines.append(f"- **{name}**: `{r.get('model', '?')}` ({world}); rows: {r['rows']}, bad: {r['bad_rows']}")
    lines += ["", "## Accuracy (%)", ""] + _table(reports, None)
    if any("quantitative" in r for r in reports.values()):
        lines += ["", "## SpatialRGPT quantitative: success within relative error", "",
                  "| model | n | 10% | 25% | 50% | unparseable | mean relative error |", "|---|---|---|---|---|---|---|"]
        for name, r in reports.items():
            q = r.get("quantitative")
            if q:
                mre = "-" if q["mean_relative_error"] is None else f"{q['mean_relative_error']:.3f}"
                lines.append(f"| {name} | {q['n']} | " + " | ".join(
                    f"{100 * v:.1f}" for v in q["success"].values()) + f" | {q['unparseable']} | {mre} |")
    if any("qualitative" in r for r in reports.values()):
        judge = next((r.get("judge") for r in reports.values() if r.get("judge")), None)
        lines += ["", f"## Qualitative, judged apart (judge: `{judge}`)", ""] + _table(reports, "qualitative")
    return "\n".join(lines) + "\n"
