"""The run report: one self-contained HTML page (inline CSS, every picture a PNG ``data:`` URI, no external
reference) written to ``RUN_DIR/report.html``.

Sections: summary, losses, schedules, kNN over time, throughput, skipped steps and data problems, attention
and PCA pictures of the trained network, the resolved config. A section whose data the run has not written yet
(no eval, no export, a crash) says so instead of failing.
"""

from __future__ import annotations

import datetime
import html
import logging
import statistics
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from dinoscale.eval.backbones import load_backbone, run_weights
from dinoscale.report.figures import (
    knn_chart,
    loss_chart,
    pictures_chart,
    png_data_uri,
    sample_images,
    schedules_chart,
    stability_chart,
    throughput_chart,
)
from dinoscale.report.run import RunSummary, format_duration, read_run
from dinoscale.viz.curves import rows_of_type

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
MAX_SKIPPED_ROWS = 50
KNOWN_EVENTS = ("eval", "final_knn", "skipped_step")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d232b; }
main { max-width: 1140px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 24px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 0 0 10px; border-bottom: 2px solid #3b6ea8; padding-bottom: 4px; }
section { background: #fff; border-radius: 6px; padding: 14px 18px; margin: 14px 0;
          box-shadow: 0 1px 3px rgba(0, 0, 0, 0.12); }
.sub { color: #5a6572; font-size: 13px; margin: 0 0 6px; }
table { border-collapse: collapse; font-size: 14px; }
td, th { text-align: left; padding: 4px 14px 4px 0; vertical-align: top; border-bottom: 1px solid #e6e8eb; }
th { color: #5a6572; font-weight: 600; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.status-finished { color: #1e7a36; font-weight: 600; }
.status-other { color: #b35900; font-weight: 600; }
.na { color: #8a6d00; background: #fff8dc; border-left: 4px solid #e0b400; padding: 6px 10px; margin: 6px 0; }
.error { color: #8b1a1a; background: #fdecec; border-left: 4px solid #c0392b; padding: 6px 10px; }
img { max-width: 100%; display: block; margin: 6px 0; }
img.pictures { image-rendering: pixelated; }
pre { background: #f7f8fa; border: 1px solid #e1e4e8; padding: 10px; font-size: 12px; overflow-x: auto; }
pre.config { column-count: 3; column-rule: 1px solid #e1e4e8; white-space: pre-wrap; overflow-wrap: anywhere; }
code { font-size: 13px; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _not_available(reason: str) -> str:
    return f'<p class="na">Not available yet: {_e(reason)}</p>'


def _figure(fig, alt: str, css_class: str = "") -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{_e(alt)}" src="{png_data_uri(fig)}">'


def _table(rows: Iterable[Tuple[str, str]]) -> str:
    """Two-column table; the values are HTML already."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _rel(run: RunSummary, path: Path) -> str:
    try:
        return str(path.relative_to(run.run_dir))
    except ValueError:
        return str(path)


def _select(run: RunSummary, key: str, default=None):
    return OmegaConf.select(run.config, key, default=default)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _final_knn_text(run: RunSummary) -> str:
    final = run.final_knn
    k = _select(run, "evaluation.knn_k")
    if final is not None:
        teacher, random_init = final.get("teacher"), final.get("random_init")
        if isinstance(teacher, (int, float)) and isinstance(random_init, (int, float)):
            return (f"teacher <b>{teacher:.2f}%</b> vs random init {random_init:.2f}% "
                    f"(top-1, k={_e(k)}, {_e(_select(run, 'evaluation.knn_test_dataset'))}, step {final['step']})")
        return _e(f"final_knn row without numbers: {final}")
    if not _select(run, "evaluation.final_knn") or not _select(run, "evaluation.knn_train_dataset"):
        return "not configured (evaluation.final_knn and evaluation.knn_train_dataset)"
    return "not available yet (measured once training finishes)"


def _last_eval_text(run: RunSummary) -> str:
    evals = rows_of_type(run.rows, "eval")
    if not evals:
        period = _select(run, "evaluation.period")
        why = "evaluation.period is 0: kNN only at the end" if not period else f"every {period} steps"
        return f"none yet ({_e(why)})"
    last = evals[-1]
    values = ", ".join(f"{_e(k)} {v:.2f}%" for k, v in last.items() if k.startswith("knn/") and
                       isinstance(v, (int, float)))
    return f"{values} at step {last['step']} ({len(evals)} evaluation(s))"


def _export_text(run: RunSummary) -> str:
    if run.exports:
        return "<br>".join(f"<code>{_e(p)}</code>" for p in run.exports)
    return "not exported yet (written to export/ when training finishes)"


def _throughput_text(run: RunSummary) -> str:
    speed = [r["images_per_s"] for r in run.train_rows if isinstance(r.get("images_per_s"), (int, float))]
    if not speed:
        return "not available yet"
    text = f"{statistics.median(speed):.1f} images/s (median of {len(speed)} log steps)"
    mfu = [r["perf/mfu"] for r in run.train_rows if isinstance(r.get("perf/mfu"), (int, float))]
    if mfu:
        text += f", MFU {100 * statistics.median(mfu):.2f}%"
    return _e(text)


def summary_section(run: RunSummary) -> str:
    status = run.status()
    status_class = "status-finished" if status == "finished" else "status-other"
    planned = run.planned_steps
    if run.last_step is None:
        steps = f"none logged yet (of {planned} planned)" if planned else "none logged yet"
    else:
        steps = f"{run.last_step} of {planned}" if planned else str(run.last_step)
    if run.checkpoints:
        newest = run.checkpoints[-1]
        ckpt = f"{len(run.checkpoints)} intact, newest <code>{_e(_rel(run, newest))}</code>"
    else:
        ckpt = "none yet"
    model = _select(run, "model.arch", "?")
    shape = [f"{k}={_select(run, 'model.' + k)}" for k in ("embed_dim", "depth", "num_heads", "patch_size")
             if _select(run, "model." + k) is not None]
    others = {}
    for row in run.rows:
        kind = row.get("type")
        if kind is not None and kind not in KNOWN_EVENTS:
            others[kind] = others.get(kind, 0) + 1
    rows = [
        ("status", f'<span class="{status_class}">{_e(status)}</span>'),
        ("run directory", f"<code>{_e(run.run_dir.resolve())}</code>"),
        ("method / backbone", _e(f"{_select(run, 'method', '?')} / {model} ({', '.join(shape)})")),
        ("training data", f"<code>{_e(_select(run, 'train.dataset'))}</code>, "
                          f"{_e(_select(run, 'train.batch_size_per_rank'))} images per rank and step"),
        ("steps", _e(steps)),
        ("wall time", _e(f"{format_duration(run.wall_time())} (config.yaml to the last write of metrics or export)")),
        ("final kNN", _final_knn_text(run)),
        ("last periodic kNN", _last_eval_text(run)),
        ("exported teacher", _export_text(run)),
        ("checkpoints", ckpt),
        ("throughput", _throughput_text(run)),
        ("metrics.jsonl", _e(f"{len(run.rows)} rows" + (f", {run.unreadable_lines} unreadable line(s) skipped"
                                                         if run.unreadable_lines else ""))),
    ]
    if others:
        rows.append(("other events", _e(", ".join(f"{k}: {v}" for k, v in sorted(others.items())))))
    return _section("summary", "Summary", _table(rows))


def chart_section(anchor: str, title: str, fig, missing: str, note: str = "") -> str:
    if fig is None:
        return _section(anchor, title, _not_available(missing))
    sub = f'<p class="sub">{_e(note)}</p>' if note else ""
    return _section(anchor, title, sub + _figure(fig, title))


def problems_section(run: RunSummary) -> str:
    if not run.train_rows and not run.skipped_steps:
        return _section("problems", "Skipped steps and data problems", _not_available("no step logged yet"))
    totals = run.data_problem_totals()
    skipped = run.skipped_steps
    worst = max((int(r.get("consecutive_bad_steps") or 0) for r in skipped), default=0)
    counts = [(name.replace("_", " "), f'<span class="num">{value:g}</span>') for name, value in totals.items()]
    if not totals:
        counts.append(("data problems", "not logged by this run (no data/* metrics)"))
    counts += [
        ("skipped steps (non-finite loss or gradient)", f'<span class="num">{len(skipped)}</span>'),
        ("most consecutive skipped steps", f'<span class="num">{worst}</span>'),
    ]
    body = _table(counts)
    if skipped:
        head = "<tr><th>step</th><th>loss</th><th>grad norm</th><th>in a row</th></tr>"
        lines = "".join(
            f"<tr><td class=num>{r['step']}</td><td class=num>{_e(r.get('loss'))}</td>"
            f"<td class=num>{_e(r.get('grad_norm'))}</td><td class=num>{_e(r.get('consecutive_bad_steps'))}</td></tr>"
            for r in skipped[:MAX_SKIPPED_ROWS])
        more = f"<p class=sub>and {len(skipped) - MAX_SKIPPED_ROWS} more</p>" if len(skipped) > MAX_SKIPPED_ROWS else ""
        body += f"<h3>Skipped steps</h3><table>{head}{lines}</table>{more}"
    fig = stability_chart(run.rows)
    if fig is not None:
        body += _figure(fig, "gradient norm and skipped steps")
    return _section("problems", "Skipped steps and data problems", body)


def pictures_section(run: RunSummary, n_images: int) -> str:
    title = "Attention maps and patch-feature PCA of the trained network"
    try:
        weights = run_weights(run.run_dir)
    except FileNotFoundError:
        return _section("pictures", title, _not_available("no exported teacher and no checkpoint yet"))
    image_size = _select(run, "evaluation.knn_image_size") or _select(run, "model.img_size")
    try:
        model = load_backbone(weights=str(run.run_dir))
        images, source, notes = sample_images(run.config, n_images)
        fig = pictures_chart(model, images, image_size)
    except Exception as exc:  # a half-written checkpoint or an unreadable image must not cost the whole report
        logger.exception("pictures of %s failed", run.run_dir)
        return _section("pictures", title, f'<p class="error">Pictures failed: {_e(type(exc).__name__)}: '
                                           f"{_e(exc)}</p>")
    p = model.patch_size
    side = (image_size // p) * p if image_size else None
    grid = f" ({side // p}x{side // p} patches of {p} px)" if side else ""
    note = (f"Weights: {_rel(run, Path(weights))}. Images: {source}, {len(images)} (one per class where "
            f"labelled), shorter side {image_size} px{grid}. Columns: the image; the CLS token's attention in the "
            "last block, averaged over heads and per head; the first principal component of the patch features; "
            "components 2-4 as RGB on the foreground (one PCA over all images).")
    body = f'<p class="sub">{_e(note)}</p>'
    if notes:
        body += f'<p class="sub">Passed over: {_e("; ".join(notes))}</p>'
    return _section("pictures", title, body + _figure(fig, title, "pictures"))


def config_section(run: RunSummary) -> str:
    return _section("config", "Resolved config (config.yaml)", f'<pre class="config">{_e(run.config_text)}</pre>')


# --------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------


def render_report(run: RunSummary, *, pictures: bool = True, n_images: int = 6) -> str:
    """The whole page as one HTML string."""
    rows = run.rows
    no_steps = "no training step logged yet"
    knn_missing = ("no kNN evaluation yet: evaluation.period is 0, so the only one is the final kNN when "
                   "training finishes" if not _select(run, "evaluation.period") else
                   f"no kNN evaluation yet (every {_select(run, 'evaluation.period')} steps)")
    if not _select(run, "evaluation.knn_train_dataset"):
        knn_missing = "no kNN evaluation configured (evaluation.knn_train_dataset is null)"
    sections: List[str] = [
        summary_section(run),
        chart_section("losses", "Loss terms", loss_chart(rows), no_steps),
        chart_section("schedules", "Schedules: learning rate, weight decay, teacher momentum and temperature",
                      schedules_chart(rows), no_steps),
        chart_section("knn", "kNN accuracy over training", knn_chart(rows), knn_missing,
                      "Lines: periodic evaluations (eval rows); stars: the final kNN of the teacher and of "
                      "the same network at random init."),
        chart_section("throughput", "Throughput", throughput_chart(rows), no_steps,
                      "Images per second over each log window (global); MFU against the device's peak when "
                      "train.log_throughput is on."),
        problems_section(run),
    ]
    if pictures:
        sections.append(pictures_section(run, n_images))
    sections.append(config_section(run))
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    name = run.run_dir.resolve().name
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>dinoscale run report: {_e(name)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>dinoscale run report: {_e(name)}</h1>"
        f'<p class="sub">Generated {_e(generated)} from <code>{_e(run.run_dir.resolve())}</code></p>'
        + "".join(sections) + "</main></body></html>\n"
    )


def write_report(run_dir: str | Path, output: Optional[str | Path] = None, *, pictures: bool = True,
                 n_images: int = 6) -> Path:
    """Write ``run_dir/report.html`` (or ``output``); :class:`dinoscale.report.run.NotARunError` when
    ``run_dir`` is not a training output directory."""
    run = read_run(run_dir)
    path = Path(output) if output is not None else run.run_dir / REPORT_NAME
    text = render_report(run, pictures=pictures, n_images=n_images)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path

