"""The experiment report: one self-contained HTML file about an evaluated model, to mail or attach.

Everything is inside the file (images as base64 data URIs, CSS inline, no external reference), so it
opens offline and shows the same thing anywhere. Built from what is stored, as the other views are:
the headline and per-class numbers from the `metrics` rows, the confusion matrices redrawn from their
`confusion_count` rows, the learning curve saved beside the checkpoint (or its `models.history`), the
images the text filter removed, the Integrated-Gradients heatmaps `explanations` wrote, and the
lineage with a fresh verification, as `emopipe trace --verify` prints them.

A few lines of script count the images that decoded and write "loaded/total" into
`<body data-images-loaded>` (and a visible warning if one failed), so a headless browser's
`--dump-dom` can check that the file renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from emopipe.atomic import atomic_write
from emopipe.catalog import ExperimentSpec
from emopipe.core.calibration import CALIBRATION_BINS, reliability_png, stored_bins
from emopipe.core.evaluation import MetricRow
from emopipe.core.evaluation_views import confusion_from_rows, confusion_png, headline_markdown
from emopipe.core.preview import thumbnails
from emopipe.core.trace import Trace, format_trace, trace
from emopipe.core.verify import verify
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.paths import data_dir, object_path, objects_dir

PER_CLASS_ORDER = ("precision", "recall", "f1", "mse", "mae", "pearson_r")  # columns of the per-class table
REMOVED_SHOWN = 32  # thumbnails of text-filtered images; the counts cover all of them
THUMBNAIL_PX = 128
OCR_TEXT_SHOWN = 40  # characters of the text OCR read, in a thumbnail's caption


class ReportError(UserError):
    """The experiment (or the model asked for) has no metrics rows to report on."""


@dataclass(frozen=True)
class Report:
    model_id: str  # the model reported on (the one named, or the newest metrics rows')
    html: str


def reports_dir() -> Path:
    """Where reports, confusion PNGs and IG heatmaps of the data dir go."""
    return data_dir() / "reports"


def report_path(experiment: str, model_id: str) -> Path:
    return reports_dir() / f"{experiment}-{model_id[:12]}.html"


def write_report(db: Database, exp: ExperimentSpec, *, model_id: str | None = None, chosen_by: str = "",
                 path: Path | None = None, objects_root: Path | None = None) -> Path:
    """Build the report (see build_report) and write it atomically, by default to
    data/reports/<experiment>-<model_id[:12]>.html; returns its path."""
    report = build_report(db, exp, model_id=model_id, chosen_by=chosen_by, objects_root=objects_root)
    path = Path(path) if path else report_path(exp.name, report.model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(report.html.encode()))
    path.chmod(0o644)  # a page to share: readable by others, unlike the private temp file it was written as
    return path


def build_report(db: Database, exp: ExperimentSpec, *, model_id: str | None = None, chosen_by: str = "",
                 objects_root: Path | None = None) -> Report:
    """The HTML report of model_id (chosen_by says who named it, e.g. "the latest evaluation
    materialization"), or of the model of the experiment's newest `metrics` rows when none is named."""
    objects_root = objects_root or objects_dir()
    if model_id is None:
        chosen_by = f"the model of the newest metrics rows of {exp.name} (no model was named)"
    chosen_by = chosen_by or "named by the caller"
    model_id = evaluated_model(db, exp.name, model_id, chosen_by)
    rows = metric_rows(db, exp.name, model_id, exp.dataset)
    lineage = trace(db, exp.name, model_id=model_id)
    classes = lineage.model.get("classes") or []
    sections = [
        ("headline", "Headline", headline_html(rows, exp)),
        ("per-class", f"Per class: {exp.dataset}, test part", per_class_html(rows, classes, exp.dataset)),
        ("confusion", "Confusion matrices (test parts)", confusion_html(rows, classes, exp)),
        ("calibration", "Calibration (test parts)", calibration_html(rows)),
        ("learning-curve", "Learning curve", learning_curve_html(lineage.model)),
        ("text-filter", "What the text filter removed", text_filter_html(db, lineage, objects_root)),
        ("explanations", "Integrated-Gradients heatmaps", explanations_html(db, exp, model_id)),
        ("lineage", "Lineage and verification", lineage_html(db, lineage, objects_root)),
    ]
    body = summary_html(exp, lineage, chosen_by) + "".join(
        f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, title, content in sections)
    return Report(model_id, page(f"emopipe report: {exp.name}", body))


def evaluated_model(db: Database, experiment: str, model_id: str | None, chosen_by: str) -> str:
    """model_id when it has metrics rows, else the model of the newest ones; a ReportError if none."""
    with db.connect() as conn:
        (found,) = conn.execute("SELECT arg_max(model_id, created_at) FROM metrics WHERE experiment = ? "
                                "AND (? IS NULL OR model_id = ?)", [experiment, model_id, model_id]).fetchone()
    if found is None:
        what = (f"model {model_id[:12]} ({chosen_by}) has no metrics rows" if model_id
                else "has not been evaluated (no metrics rows)")
        raise ReportError(f"experiment {experiment}: {what} in {db.path}; run `emopipe run {experiment}` first")
    return found


def metric_rows(db: Database, experiment: str, model_id: str, dataset: str) -> list[MetricRow]:
    """The model's metrics rows, the experiment's own dataset first and each test part before its val part
    (the order headline_markdown shows them in)."""
    with db.connect() as conn:
        found = conn.execute("""
            SELECT metric, value, class, ci_low, ci_high, n, dataset, part FROM metrics
            WHERE experiment = ? AND model_id = ?
            ORDER BY dataset <> ?, dataset, part <> 'test', part, metric, class""",
                             [experiment, model_id, dataset]).fetchall()
    return [MetricRow(*row) for row in found]


# ---------------------------------------------------------------------------------------------
# Sections


def summary_html(exp: ExperimentSpec, lineage: Trace, chosen_by: str) -> str:
    """The title and the facts that name the model: its id, how it was chosen, its split, how it was trained."""
    m = lineage.model
    hp = m.get("hyperparameters") or {}  # what the model was trained with, even if the catalog changed since
    trained = [m.get("created_at") and f"{m['created_at']:%Y-%m-%d %H:%M}", m.get("device"),
               m.get("code_version") and f"emopipe {m['code_version']}"]  # a row may lack some of them
    facts = [
        ("experiment", exp.name + (f": {exp.description}" if exp.description else "")),
        ("datasets", ", ".join(exp.datasets)),
        ("model", f"{m.get('architecture')} ({hp.get('mode')}, pretrained {hp.get('pretrained')}) at {hp.get('image_size')} px"),
        ("model_id", m["model_id"]),
        ("chosen as", chosen_by),
        ("split_id", m["split_id"]),
        ("trained", ", ".join(t for t in trained if t)),
    ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<h1>{esc(exp.name)}</h1><p class="sub">emopipe experiment report, generated {generated}</p>'
            '<p id="images-warning" class="bad" hidden></p>' + facts_table(facts, code=("model_id", "split_id")))


def headline_html(rows: Sequence[MetricRow], exp: ExperimentSpec) -> str:
    """headline_markdown's table (the numbers the UI and `emopipe run` show) as HTML, with the reference."""
    text = headline_markdown(rows, exp.reference, reference_dataset=exp.dataset)
    lines = text.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    notes = [line for line in lines if line and not line.startswith("|")]
    reference = (f"The reference is the catalog's published number, set beside {exp.dataset}/test." if exp.reference
                 else "The catalog gives no reference number for this experiment.")
    return (table_html(cells[0], cells[2:]) + "".join(f"<p>{esc(n)}</p>" for n in notes)
            + f"<p>{esc(reference)} Intervals: percentile bootstrap (95 %) over the evaluated images.</p>")


def per_class_html(rows: Sequence[MetricRow], classes: Sequence[str], dataset: str) -> str:
    """One line per class (or regression target) of the test part: its n and each per-class metric."""
    # Confusion cells and calibration bins also carry a class_name (the cell, the bin): their own sections draw them.
    cells = {(r.class_name, r.metric): r for r in rows if r.dataset == dataset and r.part == "test"
             and r.class_name is not None and not r.metric.startswith(("confusion_", "calibration_"))}
    if not cells:
        return "<p>No per-class rows for this part.</p>"
    known = list(PER_CLASS_ORDER)
    metrics = sorted(dict.fromkeys(metric for _, metric in cells), key=lambda m: known.index(m) if m in known else len(known))
    named = {name for name, _ in cells}
    names = [c for c in classes if c in named] + sorted(named - set(classes))
    lines = []
    for name in names:
        found = [cells.get((name, metric)) for metric in metrics]
        n = next(r.n for r in found if r is not None)
        lines.append([name, str(n), *(number(r.value) if r else "—" for r in found)])
    return table_html(["class", "n", *metrics], lines)


def confusion_html(rows: Sequence[MetricRow], classes: Sequence[str], exp: ExperimentSpec) -> str:
    """Each evaluated dataset's test confusion matrix, redrawn from its confusion_count rows."""
    if exp.task != "classification":
        return "<p>A regression experiment has no confusion matrix.</p>"
    figures = []
    with tempfile.TemporaryDirectory() as tmp:  # confusion_png writes a file; the report keeps only the bytes
        for k, dataset in enumerate(dict.fromkeys(r.dataset for r in rows)):
            part = [r for r in rows if r.dataset == dataset and r.part == "test"]
            if any(r.metric == "confusion_count" for r in part):
                png = confusion_png(confusion_from_rows(part, classes), classes, Path(tmp) / f"{k}.png").read_bytes()
                figures.append(figure_html(png, "image/png", f"{dataset} confusion matrix",
                                           f"{dataset}, test part: rows are true classes, columns predicted; "
                                           "each cell the fraction of its row, with the count"))
    return "".join(figures) or "<p>No confusion rows were stored.</p>"


def calibration_html(rows: Sequence[MetricRow]) -> str:
    """Each evaluated dataset's reliability diagram and ECE, redrawn from its stored calibration rows."""
    figures = []
    with tempfile.TemporaryDirectory() as tmp:  # reliability_png writes a file; the report keeps only the bytes
        for k, dataset in enumerate(dict.fromkeys(r.dataset for r in rows)):
            part = [r for r in rows if r.dataset == dataset and r.part == "test"]
            ece = next((r for r in part if r.metric == "ece"), None)
            bins = stored_bins(part)
            if ece is None or not bins:
                continue
            png = reliability_png(bins, ece.value, f"{dataset} test", Path(tmp) / f"{k}.png").read_bytes()
            interval = f" [{ece.ci_low:.3f}, {ece.ci_high:.3f}]" if ece.ci_low is not None else ""
            figures.append(figure_html(png, "image/png", f"{dataset} reliability diagram",
                                       f"{dataset}, test part: ECE {ece.value:.3f}{interval} over {CALIBRATION_BINS} "
                                       "confidence bins; bars are each bin's accuracy, the dashed line perfect calibration"))
    return "".join(figures) or "<p>No calibration rows were stored (a regression experiment, or an older evaluation).</p>"


def learning_curve_html(model: dict) -> str:
    """The curve trained_model saved beside the checkpoint; else the stored per-epoch history as a table."""
    checkpoint = model.get("checkpoint_path")
    png = Path(checkpoint).with_suffix(".png") if checkpoint else None
    caption = f"loss and metric per epoch, train and val; best epoch {model.get('best_epoch')} of {model.get('epochs_run')}"
    if png and png.is_file():
        return figure_html(png.read_bytes(), "image/png", "learning curve", caption)
    history = model.get("history") or []
    if not history:
        return "<p>No learning curve: the curve beside the checkpoint is gone and `models.history` is empty.</p>"
    header = list(history[0])
    return (f"<p>{esc(caption)} (the curve's PNG beside the checkpoint is gone; its numbers from `models.history`):</p>"
            + table_html(header, [[f"{h[k]:.4g}" if isinstance(h.get(k), float) else str(h.get(k)) for k in header]
                                  for h in history]))


def text_filter_html(db: Database, lineage: Trace, objects_root: Path) -> str:
    """The filter run's counts, the removed images per class, and thumbnails of the first REMOVED_SHOWN."""
    f = lineage.filter
    if f is None:
        return "<p>No filter run is recorded for this split.</p>"
    counts = [("input", f["n_input"]), ("kept", f["n_kept"]), ("removed (text found)", f["n_removed"]),
              ("unreadable (left out)", f["n_unreadable"])]
    summary = facts_table([(k, str(v)) for k, v in counts])
    if not f["text_filter"]:
        return f"<p>The text filter is off for this experiment: every readable image of {esc(f['dataset'])} was kept.</p>" + summary
    removed = removed_images(db, f["dataset"], f["params_hash"])
    per_class = table_html(["class", "removed"], [[c, str(n)] for c, n in sorted(Counter(r[1] for r in removed).items())])
    shown = [r for r in removed if object_path(r[0], objects_root).is_file()][:REMOVED_SHOWN]
    arrays = thumbnails([r[0] for r in shown], objects_root, tile=THUMBNAIL_PX)
    figures = [figure_html(jpeg_bytes(a), "image/jpeg", f"removed {image_id[:12]}",
                           f"{label} · {image_id[:12]}" + (f" · read “{text[:OCR_TEXT_SHOWN]}”" if text else ""))
               for a, (image_id, label, text) in zip(arrays, shown)]
    note = f"<p>{len(shown)} of {len(removed)} removed images shown (by class, then image_id).</p>" if removed else ""
    return (f"<p>Images of {esc(f['dataset'])} in which OCR found text (params hash <code>{esc(f['params_hash'])}</code>) "
            "are left out of the split.</p>" + f'<div class="side-by-side">{summary}{per_class}</div>' + note + f'<div class="thumbs">{"".join(figures)}</div>')


def removed_images(db: Database, dataset: str, params_hash: str) -> list[tuple[str, str, str | None]]:
    """(image_id, label, text read) of the dataset's images whose text_scores row says has_text."""
    with db.connect() as conn:
        return conn.execute("""
            SELECT i.image_id, i.label, s.text FROM images i
            JOIN text_scores s ON s.image_id = i.image_id AND s.params_hash = ?
            WHERE i.dataset = ? AND s.has_text ORDER BY i.label, i.image_id""", [params_hash, dataset]).fetchall()


def explanations_html(db: Database, exp: ExperimentSpec, model_id: str) -> str:
    """The heatmaps `explanations` wrote as data/reports/<experiment>-<model12>-ig/<label>-<image12>.png, each
    captioned with the model's prediction for that image from the predictions rows."""
    folder = reports_dir() / f"{exp.name}-{model_id[:12]}-ig"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return (f"<p>None for this model (explain_per_class = {exp.explain_per_class}); materializing "
                "<code>explanations</code> makes them.</p>")
    predicted = test_predictions(db, model_id, exp.dataset)
    figures = []
    for png in pngs:
        label, image = png.stem.rsplit("-", 1)
        guess = next((p for image_id, p in predicted.items() if image_id.startswith(image)), None)
        figures.append(figure_html(png.read_bytes(), "image/png", f"IG heatmap of {image}",
                                   f"true {label}" + (f" · predicted {guess[0]} ({guess[1]:.2f})" if guess else "")
                                   + f" · image {image}"))
    return ("<p>Where the model looked: the Integrated-Gradients attribution of each pixel to the predicted class, "
            "over the stored test image.</p>" + f'<div class="heatmaps">{"".join(figures)}</div>')


def test_predictions(db: Database, model_id: str, dataset: str) -> dict[str, tuple[str, float]]:
    """image_id -> (predicted class, its score) of the model's test predictions on the dataset."""
    with db.connect() as conn:
        found = conn.execute("SELECT image_id, predicted, scores FROM predictions WHERE model_id = ? AND dataset = ? "
                             "AND part = 'test'", [model_id, dataset]).fetchall()
    return {image_id: (predicted, json.loads(scores).get(predicted)) for image_id, predicted, scores in found}


def lineage_html(db: Database, lineage: Trace, objects_root: Path) -> str:
    """A fresh verification of the chain (as `emopipe trace --verify`), then the chain with its hashes."""
    checked = verify(db, lineage.experiment, model_id=lineage.model["model_id"], objects_root=objects_root)
    hashed = f"{checked.files_hashed} of {checked.files_total} image files hashed" + (
        "" if checked.files_hashed == checked.files_total else ", a random sample")
    if checked.problems:
        result = (f'<p class="bad">VERIFY FAILED: {len(checked.problems)} mismatch(es) ({hashed})</p><ul>'
                  + "".join(f"<li>{esc(str(p))}</li>" for p in checked.problems) + "</ul>")
    else:
        result = f'<p class="ok">verified: every number, fingerprint and hash below recomputed from the stored data matches ({hashed})</p>'
    return result + f"<pre>{esc(format_trace(lineage))}</pre>"


# ---------------------------------------------------------------------------------------------
# HTML pieces


def esc(text) -> str:
    return html.escape(str(text))


def number(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.3f}"


NUMERIC = re.compile(r"^[-+]?(\d|—$)")


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table; cells that read as numbers are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if NUMERIC.match(str(c)) else f"<td>{esc(c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def facts_table(facts: Sequence[tuple[str, str]], code: Sequence[str] = ()) -> str:
    """Label: value lines; the values of the labels in `code` (ids, hashes) in a monospace font."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>" + (f"<code>{esc(v)}</code>" if k in code else esc(v)) + "</td></tr>"
                   for k, v in facts)
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def figure_html(data: bytes, mime: str, alt: str, caption: str) -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'


def jpeg_bytes(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; background: #fff;
       max-width: 1180px; margin: 2rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.7rem; margin: 0; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; padding-bottom: .3rem; border-bottom: 1px solid #d0d7de; }
.sub { color: #59636e; margin: .2rem 0 1rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0 .8rem; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .8rem; border-bottom: 1px solid #e6e9ec; text-align: left; white-space: nowrap; }
thead th { background: #f6f8fa; border-bottom: 1px solid #d0d7de; }
td.num { text-align: right; }
table.facts th { background: none; color: #59636e; font-weight: 500; padding-left: 0; }
table.facts td { white-space: normal; overflow-wrap: anywhere; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: #f6f8fa; border: 1px solid #e6e9ec; border-radius: 6px; padding: .8rem 1rem;
      white-space: pre-wrap; overflow-wrap: anywhere; }
/* a table whose caption row wraps at the image's width, however long the caption */
figure { display: inline-table; vertical-align: top; margin: .4rem 1.2rem .8rem 0; }
figure img { display: block; max-width: 100%; border: 1px solid #e6e9ec; }
figcaption { display: table-caption; caption-side: bottom; font-size: .82rem; color: #59636e; margin-top: .25rem;
             overflow-wrap: anywhere; }
.thumbs figure { margin-right: .6rem; }
.thumbs figure img { width: 128px; height: 128px; object-fit: contain; background: #f6f8fa; }
.side-by-side { display: flex; flex-wrap: wrap; gap: 0 3rem; align-items: flex-start; }
.ok { color: #1a7f37; font-weight: 600; }
.bad { color: #cf222e; font-weight: 600; }
"""

# Counts the images that decoded, for a person (a warning) and a headless browser (the body attribute).
IMAGE_CHECK = """
addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
  if (loaded < images.length) {
    const warning = document.getElementById("images-warning");
    warning.textContent = (images.length - loaded) + " of " + images.length + " images in this report did not load.";
    warning.hidden = false;
  }
});
"""


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body data-images-loaded="pending">{body}<script>{IMAGE_CHECK}</script></body></html>\n')
