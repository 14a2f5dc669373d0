"""The human-readable validation report: one self-contained HTML page (no external files).

The chart is an inline SVG drawn by matplotlib, with text kept as text so non-ASCII class names
render in the browser's fonts. Long problem lists and many classes are capped so the page
stays small for datasets with 100k classes.
"""

from __future__ import annotations

import html
import io
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # validation imports this module to render its result: no runtime import back
    from imlt.trainer.data.validation import ProblemEntry, ValidationResult

MAX_ROWS = 500  # problems listed per table; the rest are counted (all are in validation.json)
MAX_BARS = 60  # above this many classes the chart shows the distribution of class sizes


def class_chart_svg(per_class: dict[str, int]) -> str:
    """Images per class as bars, or for many classes a histogram of class sizes."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no global backend state, safe in threads

    with matplotlib.rc_context({"svg.fonttype": "none"}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "glyph missing" for CJK names: the browser draws the text
        if len(per_class) <= MAX_BARS:
            fig = Figure(figsize=(max(4.0, 0.28 * len(per_class) + 1.5), 3.2))
            ax = fig.subplots()
            ax.bar(range(len(per_class)), list(per_class.values()), color="#4a7ebb")
            ax.set_xticks(range(len(per_class)), list(per_class), rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("images")
            ax.set_title("Images per class (primary label)")
        else:
            fig = Figure(figsize=(6, 3.2))
            ax = fig.subplots()
            ax.hist([n for n in per_class.values() if n > 0], bins=30, color="#4a7ebb")
            ax.set_xlabel("images in the class")
            ax.set_ylabel("classes")
            ax.set_title(f"Class sizes ({len(per_class)} classes)")
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: invalid inside HTML


def _table(title: str, rows: list[ProblemEntry], css: str) -> str:
    if not rows:
        return f"<h2>{title}</h2><p>None.</p>"
    body = "".join(
        f"<tr><td>{html.escape(r.file)}</td><td>{'' if r.line is None else r.line}</td><td>{html.escape(r.message)}</td></tr>"
        for r in rows[:MAX_ROWS]
    )
    more = f"<p>... and {len(rows) - MAX_ROWS} more in validation.json.</p>" if len(rows) > MAX_ROWS else ""
    return (
        f"<h2>{title} ({len(rows)})</h2><table class='{css}'><tr><th>file</th><th>line</th><th>problem</th></tr>"
        f"{body}</table>{more}"
    )


def render_html(result: ValidationResult) -> str:
    c = result.counts
    status = "PASSED" if result.ok else "FAILED"
    counts = {
        "samples": c.samples,
        "distinct images": c.images,
        "classes (in classes.txt)": c.classes,
        "classes with images": c.classes_present,
        "multi-label samples": c.multi_label_samples,
        "image modes": ", ".join(f"{m}: {n}" for m, n in c.modes.items()) or "-",
        "errors": c.errors,
        "warnings": c.warnings,
    } | {k: v for k, v in result.settings.items()}
    count_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in counts.items())
    chart = class_chart_svg(result.per_class) if result.per_class else "<p>No classes.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset validation: {status}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
.status {{ font-size: 1.4em; font-weight: bold; color: {'#1a7f37' if result.ok else '#c62828'}; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
table.errors td:last-child {{ color: #c62828; }}
table.warnings td:last-child {{ color: #9a6700; }}
</style></head><body>
<h1>Dataset validation</h1>
<p class="status">{status}</p>
<p>Dataset: <code>{html.escape(result.dataset_dir)}</code></p>
<h2>Counts</h2><table>{count_rows}</table>
<h2>Classes</h2>{chart}
{_table("Errors", result.errors, "errors")}
{_table("Warnings", result.warnings, "warnings")}
</body></html>
"""
