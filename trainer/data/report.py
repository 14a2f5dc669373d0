"""The human-readable validation report: one self-contained HTML page (no external files).

The chart is an inline SVG drawn by matplotlib, with text kept as text so non-ASCII class names
render in the browser's fonts. Long problem lists and many classes are capped so the page
stays small for datasets with 100k classes.
"""

from __future__ import annotations

import html
import io
import warnings

from imlt.trainer.data.validation_result import ProblemEntry, ValidationResult

MAX_ROWS = 500  # problems listed per table; the rest are counted (all are in validation.json)
MAX_BARS = 60  # above this many classes the chart shows the distribution of class sizes
TOP_ERRORS = 5  # errors repeated in the verdict box, above the fold
EXTREMES = 10  # smallest and largest classes listed by name when the chart is a histogram

# The page is read at laptop width (1280 px) and in the Pipelines UI's narrower artifact pane:
# charts scale to the page width, and paths and messages wrap instead of widening the page.
CSS = """
body { font-family: sans-serif; margin: 1.5em 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; margin: 0 0 0.4em 0; }
h2 { font-size: 1.15em; margin: 1.2em 0 0.4em 0; }
.verdict { border: 2px solid; border-radius: 6px; padding: 0.6em 1em; margin: 0.5em 0 1em 0; }
.verdict.ok { border-color: #1a7f37; background: #eef8f0; }
.verdict.failed { border-color: #c62828; background: #fdeeee; }
.verdict .status { font-size: 1.3em; font-weight: bold; }
.verdict.ok .status { color: #1a7f37; }
.verdict.failed .status { color: #c62828; }
.verdict ol { margin: 0.4em 0 0 0; padding-left: 1.4em; }
.where { color: #555; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
table.problems { width: 100%; table-layout: fixed; }
table.problems col.file { width: 38%; } table.problems col.line { width: 4.5em; }
code, td, li { overflow-wrap: anywhere; word-break: break-word; }
table.errors td:last-child { color: #c62828; }
table.warnings td:last-child { color: #9a6700; }
td.fail { color: #c62828; font-weight: bold; } td.pass { color: #1a7f37; }
.chart svg { max-width: 100%; height: auto; }
"""


def class_chart_svg(per_class: dict[str, int]) -> str:
    """Images per class as bars, or for many classes a histogram of class sizes.

    The SVG keeps its viewBox and the page's CSS scales it to the page width, so even the
    widest bar chart (MAX_BARS classes) fits a laptop screen without a horizontal scrollbar.
    """
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: no global backend state, safe in threads
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"svg.fonttype": "none"}), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "glyph missing" for CJK names: the browser draws the text
        if len(per_class) <= MAX_BARS:
            fig = Figure(figsize=(min(12.0, max(5.0, 0.28 * len(per_class) + 1.5)), 3.2))
            ax = fig.subplots()
            ax.bar(range(len(per_class)), list(per_class.values()), color="#4a7ebb")
            ax.set_xticks(range(len(per_class)), list(per_class), rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("images")
            ax.set_title("Images per class (primary label)")
        else:
            fig = Figure(figsize=(7, 3.2))
            ax = fig.subplots()
            sizes = [n for n in per_class.values() if n > 0]
            lo, hi = (min(sizes), max(sizes)) if sizes else (0, 1)
            # one bar per size while sizes are few (class sizes are integers: 30 even bins would
            # leave gaps and double bars), 30 bins otherwise
            bins = [b - 0.5 for b in range(lo, hi + 2)] if hi - lo < 60 else 30
            ax.hist(sizes, bins=bins, color="#4a7ebb", edgecolor="white", linewidth=0.5)
            pad = max(2.0, 0.05 * (hi - lo))  # one size alone would otherwise fill the whole axis
            ax.set_xlim(max(0.0, lo - 0.5 - pad), hi + 0.5 + pad)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("images in the class")
            ax.set_ylabel("classes")
            ax.set_title(f"Class sizes ({len(per_class)} classes)")
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: invalid inside HTML


def _where(r: ProblemEntry) -> str:
    return html.escape(r.file) + ("" if r.line is None else f":{r.line}")


def _table(title: str, rows: list[ProblemEntry], css: str) -> str:
    if not rows:
        return f"<h2 id='{css}'>{title}</h2><p>None.</p>"
    body = "".join(
        f"<tr><td>{html.escape(r.file)}</td><td>{'' if r.line is None else r.line}</td><td>{html.escape(r.message)}</td></tr>"
        for r in rows[:MAX_ROWS]
    )
    more = f"<p>... and {len(rows) - MAX_ROWS} more in validation.json.</p>" if len(rows) > MAX_ROWS else ""
    return (
        f"<h2 id='{css}'>{title} ({len(rows)})</h2><table class='problems {css}'>"
        "<colgroup><col class='file'><col class='line'><col></colgroup>"
        f"<tr><th>file</th><th>line</th><th>problem</th></tr>{body}</table>{more}"
    )


def _verdict(result: ValidationResult) -> str:
    """The first thing on the page: passed or not, how many errors, and the first few of them."""
    c = result.counts
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    if result.ok:
        head = f"<span>PASSED</span>: no errors, {plural(c.warnings, 'warning')}"
    else:
        head = f"<span>FAILED</span>: {plural(c.errors, 'error')}, {plural(c.warnings, 'warning')}"
    # the errors when there are any (they stop training), else the warnings
    shown, kind, total = (result.errors, "errors", c.errors) if result.errors else (result.warnings, "warnings", c.warnings)
    items = "".join(f"<li>{html.escape(r.message)} <span class='where'>({_where(r)})</span></li>"
                    for r in shown[:TOP_ERRORS])
    first = ""
    if items:
        label = f"First {kind}" if total > TOP_ERRORS else kind.capitalize()
        more = f" <a href='#{kind}'>All {total} below.</a>" if total > TOP_ERRORS else ""
        lead = "Training can start. " if kind == "warnings" else ""
        first = f"<div>{lead}{label}:{more}</div><ol>{items}</ol>"
    css = "ok" if result.ok else "failed"
    return f"<div class='verdict {css}'><div class='status'>{head}</div>{first}</div>"


def _checks(result: ValidationResult) -> str:
    """Each setting beside the value measured on this dataset, so a reader sees how close it is."""
    s, present = result.settings, [n for n in result.per_class.values() if n > 0]
    rows: list[tuple[str, str, str, bool | None]] = []
    if "min_images_per_class" in s:
        smallest = min(present) if present else 0
        rows.append(("smallest class", f"{smallest} image{'' if smallest == 1 else 's'}", f"min_images_per_class = {s['min_images_per_class']:g} (error below)",
                     smallest >= s["min_images_per_class"] if present else None))
    if "imbalance_ratio" in s:
        if len(present) >= 2:
            ratio = max(present) / min(present)
            rows.append(("imbalance (largest / smallest class)", f"{ratio:.1f}x ({max(present)} / {min(present)} images)",
                         f"imbalance_ratio = {s['imbalance_ratio']:g} (warning above)", ratio <= s["imbalance_ratio"]))
        else:
            rows.append(("imbalance (largest / smallest class)", "-", f"imbalance_ratio = {s['imbalance_ratio']:g} (warning above)", None))
    for key, value in s.items():
        if key not in ("min_images_per_class", "imbalance_ratio"):
            rows.append((key.replace("_", " "), "checked per image", f"{key} = {value:g}", None))
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td class='{'' if ok is None else ('pass' if ok else 'fail')}'>{html.escape(measured)}</td>"
        f"<td>{html.escape(setting)}</td></tr>"
        for name, measured, setting, ok in rows)
    return f"<table><tr><th>check</th><th>measured</th><th>setting</th></tr>{body}</table>"


def _extremes(per_class: dict[str, int]) -> str:
    """With a histogram instead of bars, name the classes a reader would look for: the extremes."""
    if len(per_class) <= MAX_BARS:
        return ""
    ranked = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))
    fmt = lambda kvs: ", ".join(f"{html.escape(k)} ({v})" for k, v in kvs)  # noqa: E731
    return (f"<p>Smallest classes: {fmt(ranked[:EXTREMES])}.<br>"
            f"Largest classes: {fmt(reversed(ranked[-EXTREMES:]))}.<br>Every class's count is in validation.json.</p>")


def _split_of(dataset_dir: str) -> str | None:
    """The split read_data recorded for this dataset (train, val, ...); None if unreadable."""
    from imlt.trainer.data.manifest import read_summary

    try:
        return read_summary(dataset_dir).split
    except Exception:  # noqa: BLE001 - a report of a broken dataset must still render
        return None


def render_html(result: ValidationResult, split: str | None = None) -> str:
    """The page; `split` names the dataset in the title (read from its summary when not given)."""
    c = result.counts
    status = "PASSED" if result.ok else "FAILED"
    split = split or _split_of(result.dataset_dir)
    name = f"split '{split}'" if split else "dataset"
    title = f"Validation of {name}: {status} ({c.errors} errors, {c.warnings} warnings)"
    counts = {
        "samples": c.samples,
        "distinct images": c.images,
        "classes (in classes.txt)": c.classes,
        "classes with images": c.classes_present,
        "multi-label samples": c.multi_label_samples,
        "image modes": ", ".join(f"{m}: {n}" for m, n in c.modes.items()) or "-",
    }
    count_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in counts.items())
    chart = class_chart_svg(result.per_class) if result.per_class else "<p>No classes.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>Validation of {html.escape(name)}</h1>
{_verdict(result)}
<p>Dataset: <code>{html.escape(result.dataset_dir)}</code></p>
<h2>Checks: measured values and settings</h2>{_checks(result)}
<h2>Counts</h2><table>{count_rows}</table>
<h2>Classes</h2><div class="chart">{chart}</div>{_extremes(result.per_class)}
{_table("Errors", result.errors, "errors")}
{_table("Warnings", result.warnings, "warnings")}
</body></html>
"""
