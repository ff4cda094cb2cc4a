"""What selection cut and why, for a person to check: DuckDB queries over the run's Parquet files.

``funnel(run_dir)`` accounts for every input row (rows in = kept + dropped + quarantined + exact
duplicates, checked). ``build_report(run_dir, config)`` writes ``RUN/report/``: the funnel, the rows and
missing captions per source, score
histograms with the thresholds drawn in, the concept distribution before and after balancing, and
contact sheets (thumbnail grids labelled with id and score) of kept rows and of the rows each filter
dropped, all shown by one ``index.html`` that links the PNGs relatively (the folder can be copied
or served as it is).
"""

from __future__ import annotations

import html
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline import schema
from pipeline.config import (
    BALANCE_QUOTA,
    FILTERS_BY_NAME,
    NEAR_DUPLICATES,
    THRESHOLD_FILTERS,
    PipelineConfig,
)
from pipeline.errors import UserError
from pipeline.layout import RunLayout
from pipeline.select import SelectError, selection_summary

_GRID_COLUMNS = 8
_LABEL_HEIGHT = 30
_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6rem 0; }
td, th { padding: 0.25rem 0.8rem; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 0.8rem; background: #4a7fb5; vertical-align: middle; }
.drop .bar { background: #c55; } .ok { color: #286; } .bad { color: #c22; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; } .muted { color: #777; }
nav a { margin-right: 1rem; }
"""


_NOT_DROPS = ("rows in", "ingested", "kept")  # funnel stages that count rows rather than drop them


class ReportError(UserError):
    """The run's stages disagree (e.g. a stale selection): the report would be wrong, so none is written."""


@dataclass(frozen=True)
class _Sources:
    layout: RunLayout
    con: duckdb.DuckDBPyConnection
    has_quarantine: bool
    has_duplicates: bool


def _open(run_dir: Path) -> _Sources:
    layout = RunLayout(run_dir)
    if not layout.selection.is_file():
        raise SelectError(f"no selection at {layout.selection}: run select first")
    if not layout.ingest_shards():
        raise SelectError(f"no ingest shards in {layout.ingest}: run ingest first")
    con = duckdb.connect()

    def view(name: str, paths: Sequence[Path], **options) -> None:
        con.read_parquet([str(p) for p in paths], **options).create_view(name)

    view("ingest", layout.ingest_shards())
    view("selection", [layout.selection])
    if layout.score_shards():
        view("scores", layout.score_shards(), union_by_name=True)
    else:
        con.execute("CREATE VIEW scores AS SELECT id FROM selection")
    for name, path in (("quarantine", layout.quarantine), ("duplicates", layout.duplicates)):
        if path.is_file():
            view(name, [path])
    return _Sources(layout, con, layout.quarantine.is_file(), layout.duplicates.is_file())


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    return dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {view})").fetchall())


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    return con.execute(sql).fetchone()[0]


def _filter_of(reason: str) -> str:
    """The filter a drop reason belongs to (a null-score reason belongs to the filter reading that column)."""
    for f in THRESHOLD_FILTERS:
        if reason in (f.name, f.null_reason):
            return f.name
    return reason


def _funnel(src: _Sources) -> list[dict]:
    con = src.con
    ingested = _scalar(con, "SELECT count(*) FROM ingest")
    selected = _scalar(con, "SELECT count(*) FROM selection")
    if selected != ingested:
        raise ReportError(f"the selection has {selected} rows but ingest has {ingested}: the selection is stale, run select again")
    duplicates = _scalar(con, "SELECT count(*) FROM duplicates") if src.has_duplicates else 0
    quarantine = (
        con.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC, 1").fetchall()
        if src.has_quarantine
        else []
    )
    drops = dict(con.execute("SELECT drop_reason, count(*) FROM selection WHERE NOT keep GROUP BY 1").fetchall())
    kept = _scalar(con, "SELECT count(*) FROM selection WHERE keep")
    quarantined = sum(n for _, n in quarantine)
    rows_in = ingested + duplicates + quarantined

    rows: list[dict] = []
    remaining = rows_in

    def step(stage: str, reason: str | None, n: int, drop: bool = True) -> None:
        nonlocal remaining
        if drop:
            remaining -= n
        rows.append({"stage": stage, "reason": reason, "rows": n, "remaining": remaining})

    step("rows in", None, rows_in, drop=False)
    step("exact duplicates", "exact_duplicate", duplicates)
    for reason, n in quarantine:
        step("quarantined", reason, n)
    step("ingested", None, ingested, drop=False)
    # filters in declaration order; a drop counts once, under its first failing filter
    order = [r for f in THRESHOLD_FILTERS for r in (f.name, f.null_reason)] + [NEAR_DUPLICATES, BALANCE_QUOTA]
    for reason in sorted(drops, key=lambda r: order.index(r) if r in order else len(order)):
        step("balance" if reason == BALANCE_QUOTA else _filter_of(reason), reason, drops[reason])
    step("kept", None, kept, drop=False)
    dropped = sum(drops.values())
    if rows_in != kept + dropped + quarantined + duplicates or remaining != kept:
        raise ReportError(
            f"rows in ({rows_in}) != kept ({kept}) + dropped ({dropped}) + quarantined ({quarantined}) "
            f"+ exact duplicates ({duplicates}): the run's files disagree"
        )
    return rows


def funnel(run_dir: Path) -> list[dict]:
    """Every input row, accounted for: one dict per step with ``stage``, ``reason``, ``rows`` and
    ``remaining`` (rows still in after the step). Stages: ``rows in``, ``exact duplicates``,
    ``quarantined``, ``ingested``, then one per filter (named as in the config; a filter can drop for
    two reasons, e.g. ``min_clip_score`` and ``clip_score_null``), ``balance`` and ``kept``. A drop
    counts once, under its first failing filter, so the drop steps add up to rows in - kept. Raises
    ReportError if the run's files do not add up."""
    return _funnel(_open(Path(run_dir)))


def funnel_markdown(rows: list[dict]) -> str:
    """The funnel as a markdown table (for Prefect artifacts and terminals)."""
    lines = ["| stage | reason | rows | remaining |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['stage']} | {r['reason'] or ''} | {r['rows']:,} | {r['remaining']:,} |" for r in rows]
    return "\n".join(lines)


def captions_by_source(run_dir: Path) -> list[tuple[str, int, int]]:
    """(source, ingested rows, rows without a caption) per source, in source order."""
    return _captions(_open(Path(run_dir)))


def _captions(src: _Sources) -> list[tuple[str, int, int]]:
    return src.con.execute(
        f"SELECT {schema.SOURCE}, count(*), count(*) FILTER (WHERE {schema.CAPTION} IS NULL) FROM ingest GROUP BY 1 ORDER BY 1"
    ).fetchall()


# --- figures -------------------------------------------------------------------------------------

_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE"}
# Scores worth a histogram, in the order the filters run (pHash is an id, not a quantity).
_HISTOGRAM_ORDER = [f.column for f in THRESHOLD_FILTERS] + [schema.CONCEPT_CONFIDENCE]


def _histograms(src: _Sources, summary: dict, config: PipelineConfig, out: Path) -> list[str]:
    """One small histogram per numeric score, all ingested rows vs kept rows, thresholds drawn in."""
    columns = [c for c, kind in _columns(src.con, "scores").items() if kind in _NUMERIC]
    ingest_numeric = [c for c in (schema.ENGAGEMENT,) if _scalar(src.con, f"SELECT count({c}) FROM ingest")]
    wanted = [c for c in _HISTOGRAM_ORDER if c in columns or c in ingest_numeric]
    if not wanted:
        return []
    thresholds = {FILTERS_BY_NAME[name].column: (name, value) for name, value in summary["thresholds"].items()}
    figure = Figure(figsize=(4.2 * min(3, len(wanted)), 3.0 * ((len(wanted) + 2) // 3)), layout="constrained")
    select_list = ", ".join(f'"{c}"' for c in wanted)
    data = src.con.execute(
        f"SELECT {select_list}, sel.keep FROM ingest i LEFT JOIN scores s USING (id) JOIN selection sel USING (id)"
    ).fetchnumpy()
    keep = np.asarray(data["keep"], bool)
    for k, column in enumerate(wanted):
        axis = figure.add_subplot((len(wanted) + 2) // 3, min(3, len(wanted)), k + 1)
        values = np.asarray(np.ma.filled(np.ma.asarray(data[column], dtype=np.float64), np.nan), np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            axis.set_title(f"{column} (no values)")
            continue
        bins = np.histogram_bin_edges(values[finite], bins=config.report.histogram_bins)
        axis.hist(values[finite], bins=bins, color="#bbb", label=f"all ({finite.sum():,})")
        axis.hist(values[finite & keep], bins=bins, color="#4a7fb5", label=f"kept ({(finite & keep).sum():,})")
        if column in thresholds:
            name, value = thresholds[column]
            axis.axvline(value, color="#c22", linestyle="--", label=f"{name} {value:g}")
        nulls = int((~finite).sum())
        axis.set_title(column + (f"  ({nulls:,} null)" if nulls else ""), fontsize=10)
        axis.legend(fontsize=7, frameon=False)
        axis.tick_params(labelsize=8)
    figure.savefig(out / "scores.png", dpi=90)
    return ["scores.png"]


def _concepts(src: _Sources, out: Path) -> list[tuple[str, int, int, int]]:
    """Rows per concept: ingested, passed the filters (before balancing), kept (after)."""
    if _scalar(src.con, "SELECT count(concept) FROM selection") == 0:
        return []
    rows = src.con.execute(
        f"""SELECT coalesce(concept, '{schema.OTHER_CONCEPT}') AS c, count(*),
                   count(*) FILTER (WHERE keep OR drop_reason = '{BALANCE_QUOTA}'), count(*) FILTER (WHERE keep)
            FROM selection GROUP BY c ORDER BY 3 DESC, c"""
    ).fetchall()
    names = [r[0] for r in rows]
    figure = Figure(figsize=(8, 0.8 + 0.32 * len(names)), layout="constrained")
    axis = figure.add_subplot()
    y = np.arange(len(names))
    for offset, k, colour, label in ((-0.27, 1, "#ccc", "ingested"), (0, 2, "#9bb8d6", "passed the filters (before balancing)"), (0.27, 3, "#4a7fb5", "kept (after balancing)")):
        axis.barh(y + offset, [r[k] for r in rows], height=0.27, color=colour, label=label)
    axis.set_yticks(y, names)
    axis.invert_yaxis()
    axis.set_xlabel("rows")
    figure.legend(fontsize=8, frameon=False, loc="outside upper center", ncols=3)
    figure.savefig(out / "concepts.png", dpi=90)
    return rows


# --- contact sheets ------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _cell(thumbnail: bytes | None, lines: Sequence[str], size: int, font) -> Image.Image:
    cell = Image.new("RGB", (size, size + _LABEL_HEIGHT), "white")
    try:
        image = ImageOps.contain(Image.open(io.BytesIO(thumbnail)).convert("RGB"), (size - 4, size - 4))
        cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    except (OSError, ValueError, TypeError):  # missing or undecodable: the report shows the gap, not a traceback
        ImageDraw.Draw(cell).text((8, size // 2), "no thumbnail", fill="#c22", font=font)
    draw = ImageDraw.Draw(cell)
    for k, line in enumerate(lines[:2]):
        draw.text((4, size + 1 + 14 * k), line, fill="#222", font=font)
    return cell


def _sheet(cells: list[tuple[bytes | None, list[str]]], size: int, path: Path) -> None:
    font = _font(11)
    columns = min(_GRID_COLUMNS, len(cells))
    rows = (len(cells) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (size + 4) + 4, rows * (size + _LABEL_HEIGHT + 4) + 4), "#eee")
    for k, (thumbnail, lines) in enumerate(cells):
        x, y = 4 + (k % columns) * (size + 4), 4 + (k // columns) * (size + _LABEL_HEIGHT + 4)
        sheet.paste(_cell(thumbnail, lines, size, font), (x, y))
    sheet.save(path, optimize=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "null"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class _Sheet:
    name: str
    title: str
    total: int
    cells: list[tuple[str, list[str]]]  # (id whose thumbnail fills the cell, label lines)


def _plan_sheets(src: _Sources, summary: dict, config: PipelineConfig) -> list[_Sheet]:
    """Kept rows and, per filter, rows that filter dropped (any of their reasons), each a deterministic
    sample (ordered by a hash of the id, so reruns show the same faces). Only ids and scores here:
    thumbnails are fetched afterwards in one pass for every sheet."""
    con, k = src.con, config.report.contact_sheet_samples
    score_columns = set(_columns(con, "scores"))
    rank = summary.get("rank_by")
    rank_sql = f's."{rank}"' if rank in score_columns else "NULL"

    def sheet(name: str, title: str, where: str, value_sql: str, label: str) -> _Sheet:
        rows = con.execute(
            f"""SELECT sel.id, {value_sql}, sel.concept FROM selection sel LEFT JOIN scores s USING (id)
                {"LEFT JOIN (SELECT id, engagement FROM ingest) i USING (id)" if "i." in value_sql else ""}
                WHERE {where} ORDER BY hash(sel.id), sel.id LIMIT {k}"""
        ).fetchall()
        total = _scalar(con, f"SELECT count(*) FROM selection sel WHERE {where}")
        cells = [(row_id, [row_id[:10] + (f"  {concept}" if concept else ""), f"{label} {_fmt(v)}"]) for row_id, v, concept in rows]
        return _Sheet(name, title, total, cells)

    sheets = [sheet("kept", "kept", "sel.keep", rank_sql, rank or "")]
    for name in summary["applied_filters"] + [BALANCE_QUOTA]:
        if name == NEAR_DUPLICATES:
            sheets.append(_plan_near_duplicates(src, k))
            continue
        f = FILTERS_BY_NAME.get(name)
        reasons = [f.name, f.null_reason] if f else [name]
        where = " OR ".join(f"list_contains(sel.drop_reasons, '{r}')" for r in reasons)
        column = f.column if f else rank
        value_sql = f's."{column}"' if column in score_columns else ("i.engagement" if column == schema.ENGAGEMENT else rank_sql)
        rule = f" (kept when {f.column} {f.op} {_fmt(summary['thresholds'][name])})" if f else ""
        sheets.append(sheet(name, f"dropped by {name}{rule}", where, value_sql, column or ""))
    return [s for s in sheets if s.cells]


def _plan_near_duplicates(src: _Sources, k: int) -> _Sheet:
    """Pairs, side by side: each dropped near-duplicate, then the representative kept in its place,
    with their pHash distance, so the distance threshold can be judged by eye."""
    rows = src.con.execute(
        f"""SELECT d.id, d.near_dup_group, bit_count(xor(ds.phash, rs.phash))
            FROM selection d JOIN scores ds ON ds.id = d.id JOIN scores rs ON rs.id = d.near_dup_group
            WHERE d.drop_reason = '{NEAR_DUPLICATES}'
            ORDER BY hash(d.id), d.id LIMIT {max(1, k // 2)}"""
    ).fetchall()
    total = _scalar(src.con, f"SELECT count(*) FROM selection WHERE drop_reason = '{NEAR_DUPLICATES}'")
    cells: list[tuple[str, list[str]]] = []
    for dup_id, rep_id, distance in rows:
        cells += [(dup_id, [dup_id[:10], f"dropped, {distance} bits"]), (rep_id, [rep_id[:10], "its representative"])]
    return _Sheet(NEAR_DUPLICATES, "dropped near-duplicates (left) beside their kept representative (right)", total, cells)


def _draw_sheets(src: _Sources, sheets: list[_Sheet], size: int, out: Path) -> list[dict]:
    ids = sorted({row_id for sheet in sheets for row_id, _ in sheet.cells})
    thumbnails = dict(
        src.con.execute("SELECT id, thumbnail FROM ingest WHERE id IN (SELECT unnest($ids))", {"ids": ids}).fetchall()
    ) if ids else {}
    drawn = []
    for sheet in sheets:
        file = f"sheet-{sheet.name}.png"
        _sheet([(thumbnails.get(row_id), lines) for row_id, lines in sheet.cells], size, out / file)
        shown = len(sheet.cells) // 2 if sheet.name == NEAR_DUPLICATES else len(sheet.cells)
        drawn.append({"name": sheet.name, "title": sheet.title, "file": file, "shown": shown, "total": sheet.total})
    return drawn


# --- the page ------------------------------------------------------------------------------------


def _html(run_dir: Path, rows: list[dict], summary: dict, config: PipelineConfig, any_reason: list[tuple],
          figures: list[str], concepts: list[tuple], sheets: list[dict], captions: list[tuple],
          learned: str = "") -> str:
    e = html.escape
    rows_in = rows[0]["rows"] or 1
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>needles selection report: {e(run_dir.name)}</title>",
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>Selection report</h1><p class='muted'>{e(str(run_dir))}</p>",
           ("<nav><a href='#funnel'>funnel</a><a href='#sources'>sources</a><a href='#filters'>filters</a><a href='#scores'>scores</a>"
            "<a href='#concepts'>concepts</a><a href='#sheets'>contact sheets</a>"
            + ("<a href='#learned'>learned from the annotators</a>" if learned else "") + "</nav>")]
    kept = rows[-1]["rows"]
    dropped = sum(r["rows"] for r in rows if r["stage"] not in _NOT_DROPS + ("quarantined", "exact duplicates"))
    quarantined = sum(r["rows"] for r in rows if r["stage"] in ("quarantined", "exact duplicates"))
    out.append(f"<h2 id='funnel'>Funnel</h2><p class='ok'>rows in {rows[0]['rows']:,} = kept {kept:,} + dropped {dropped:,} "
               f"+ quarantined and exact duplicates {quarantined:,} &#10003;</p>")
    out.append("<table><tr><th>stage</th><th>reason</th><th>rows</th><th>remaining</th><th></th></tr>")
    for r in rows:
        drop = r["stage"] not in _NOT_DROPS
        share = r["rows"] / rows_in
        out.append(f"<tr class='{'drop' if drop else ''}'><td>{e(r['stage'])}</td><td>{e(r['reason'] or '')}</td>"
                   f"<td class='n'>{r['rows']:,}</td><td class='n'>{r['remaining']:,}</td>"
                   f"<td><span class='bar' style='width:{max(1, round(300 * share))}px'></span> {100 * share:.1f}%</td></tr>")
    out.append("</table>")

    missing = sum(m for _, _, m in captions)
    out.append("<h2 id='sources'>Sources</h2>")
    if missing:
        out.append(f"<p class='bad'>captions missing: {missing:,} of {sum(n for _, n, _ in captions):,} ingested rows have "
                   "no caption (a folder without a sidecar, or no sidecar row / an empty caption for them); they have "
                   f"no CLIP score and {FILTERS_BY_NAME['min_clip_score'].null_reason} drops them when min_clip_score is set</p>")
    out.append("<table><tr><th>source</th><th>ingested</th><th>captions missing</th><th></th></tr>")
    for source, n, m in captions:
        out.append(f"<tr><td>{e(source)}</td><td class='n'>{n:,}</td><td class='n{' bad' if m else ''}'>{m:,}</td>"
                   f"<td>{100 * m / max(n, 1):.1f}%</td></tr>")
    out.append("</table>")

    out.append("<h2 id='filters'>Filters</h2><table><tr><th>filter</th><th>rule</th><th>rows failing it (any reason)</th></tr>")
    failing = dict(any_reason)
    for name in summary["applied_filters"]:
        f = FILTERS_BY_NAME.get(name)
        rule = (f"{f.column} {f.op} {_fmt(summary['thresholds'][name])}; null: {'passes' if f.null_passes else f.null_reason}"
                if f else f"pHash within {summary['near_duplicate_max_distance']} bits: keep the best by {summary['rank_by']}")
        n = failing.get(name, 0) + (failing.get(f.null_reason, 0) if f else 0)
        out.append(f"<tr><td>{e(name)}</td><td>{e(rule)}</td><td class='n'>{n:,}</td></tr>")
    target, rank_by = summary["target_size"], summary["rank_by"]
    rule = f"balance to {target:,} rows, ranked by {rank_by} inside each concept" if target else "off (target_size: null)"
    out.append(f"<tr><td>{BALANCE_QUOTA}</td><td>{e(rule)}</td>"
               f"<td class='n'>{failing.get(BALANCE_QUOTA, 0):,}</td></tr></table>")
    if summary["skipped_filters"]:
        out.append("<p class='bad'>Skipped (set in the config, but the scored table has no such column): "
                   + ", ".join(e(s) for s in summary["skipped_filters"]) + "</p>")
    off = [f.name for f in THRESHOLD_FILTERS if getattr(config.filters, f.name) is None]
    if off:
        out.append("<p class='muted'>Off (null in the config): " + ", ".join(e(s) for s in off) + "</p>")

    out.append("<h2 id='scores'>Score histograms</h2>")
    out += [f"<p><img src='{e(f)}' alt='score histograms'></p>" for f in figures] or ["<p class='muted'>no numeric scores</p>"]
    out.append("<h2 id='concepts'>Concepts before and after balancing</h2>")
    if concepts:
        out.append("<p><img src='concepts.png' alt='concept distribution'></p><table><tr><th>concept</th><th>ingested</th>"
                   "<th>passed the filters</th><th>kept</th></tr>")
        out += [f"<tr><td>{e(c)}</td><td class='n'>{a:,}</td><td class='n'>{b:,}</td><td class='n'>{k:,}</td></tr>" for c, a, b, k in concepts]
        out.append("</table>")
    else:
        out.append("<p class='muted'>no concept column: all rows were balanced as one domain</p>")
    if summary.get("quota_concepts_absent"):
        out.append("<p class='bad'>Quotas for concepts no row carries (a typo?): "
                   + ", ".join(e(c) for c in summary["quota_concepts_absent"]) + "</p>")
    out.append("<h2 id='sheets'>Contact sheets</h2>")
    for sheet in sheets:
        out.append(f"<h3>{e(sheet['title'])}</h3><p class='muted'>{sheet['shown']} of {sheet['total']:,} rows</p>"
                   f"<p><img src='{e(sheet['file'])}' alt='{e(sheet['title'])}'></p>")
    out.append(learned)
    out.append("</body></html>")
    return "\n".join(out)


def _learned(layout: RunLayout) -> str:
    """What the annotators' votes taught (annotation/active.py, after ``python -m annotation active``):
    each round's head with its held-out AUC, and the proposed threshold changes. Shown, never applied:
    a person edits the config and reruns select."""
    from annotation.layout import ActiveLayout

    active = ActiveLayout(layout.annotation)
    if not active.summary.exists():
        return ""
    e = html.escape
    summary = json.loads(active.summary.read_text())
    out = ["<h2 id='learned'>Learned from the annotators (proposals, not applied)</h2>",
           f"<p class='muted'>keep-probability heads on the {e(summary['features'])} features, trained on each finished "
           f"round's votes ({e(str(active.root))}); out-of-fold figures</p>",
           "<table><tr><th>round</th><th>images</th><th>votes</th><th>kept share</th><th>AUC (95% CI)</th>"
           "<th>Brier / constant</th><th>ECE</th><th>used to rank</th></tr>"]
    for r in summary["rounds"]:
        out.append(f"<tr><td>{e(r['round'])}</td><td class='n'>{r['images']:,}</td><td class='n'>{r['votes']:,}</td>"
                   f"<td class='n'>{r['positive_share']:.2f}</td><td class='n'>{r['auc']:.2f} ({r['auc_ci'][0]:.2f}-"
                   f"{r['auc_ci'][1]:.2f})</td><td class='n'>{r['brier']:.3f} / {r['brier_constant']:.3f}</td>"
                   f"<td class='n'>{r['ece']:.3f}</td><td>{'yes' if r['beats_constant'] else 'no: not better than a constant'}</td></tr>")
    out.append("</table>")
    out += [f"<p class='muted'>{e(name)}: no head ({e(why)})</p>" for name, why in summary["skipped_rounds"].items()]
    if not summary["proposals"]:
        out.append("<p class='muted'>no threshold change proposed</p>")
        return "\n".join(out)
    out.append("<table><tr><th>filter</th><th>current</th><th>proposed</th><th>kind</th><th>rows</th><th>evidence</th></tr>")
    for p in summary["proposals"]:
        out.append(f"<tr><td>{e(p['filter'])} ({e(p['column'])} {e(p['op'])})</td><td class='n'>{_fmt(p['current'])}</td>"
                   f"<td class='n'>{_fmt(p['proposed'])}</td><td>{e(p['direction'])}</td><td class='n'>{p['rows_affected']:,}</td>"
                   f"<td>{e(p['evidence'])}</td></tr>")
    out.append("</table><p class='muted'>to apply one, change it in the config and rerun select and report</p>")
    return "\n".join(out)


def build_report(run_dir: Path, config: PipelineConfig) -> Path:
    """Write ``RUN/report/`` (index.html + PNGs) and return the path of index.html."""
    run_dir = Path(run_dir)
    src = _open(run_dir)
    rows = _funnel(src)
    summary = selection_summary(pq.read_schema(src.layout.selection))
    staging = src.layout.report.with_name(src.layout.report.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    any_reason = src.con.execute("SELECT r, count(*) FROM (SELECT unnest(drop_reasons) AS r FROM selection) GROUP BY r").fetchall()
    figures = _histograms(src, summary, config, staging)
    concepts = _concepts(src, staging)
    sheets = _draw_sheets(src, _plan_sheets(src, summary, config), config.report.contact_sheet_cell, staging)
    captions = _captions(src)
    (staging / "index.html").write_text(
        _html(run_dir, rows, summary, config, any_reason, figures, concepts, sheets, captions,
              _learned(src.layout)), encoding="utf-8"
    )
    shutil.rmtree(src.layout.report, ignore_errors=True)
    staging.rename(src.layout.report)
    return src.layout.report / "index.html"
