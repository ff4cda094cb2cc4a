"""The evaluation report, ``RUN/report/index.html``, for a person to answer "did quality-tuning help?":

- the human A/B verdicts: win / tie / lose bars with their 95% CIs (cluster bootstrap over prompts) for both
  aggregation rules, net win, sign test, and the checks on the voters (gold accuracy, swapped repeats,
  position bias, Fleiss' kappa, votes excluded and why);
- per category: the A/B win rate and the automatic judges;
- the automatic judges per checkpoint (means with CIs) and the distribution metrics (KID, CMMD);
- side-by-side grids of the same prompt and seed for every checkpoint;
- the pairs the voters disagreed on most, as they saw them (left / right).

It only reads the files the stages wrote (manifest, judges summary, A/B pairs, votes and summaries), so it can
be rebuilt at any time; PNGs sit beside the HTML and are linked relatively (the folder can be copied).
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from model.evaluation import schema
from model.evaluation.errors import EvaluationError
from model.evaluation.layout import EvalLayout
from model.evaluation.schema import read_manifest

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem; color: #222; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; } h3 { margin-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.6rem 0; } td, th { padding: 0.25rem 0.8rem; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } img { max-width: 100%; border: 1px solid #ddd; }
.muted { color: #777; } .good { color: #286; } .bad { color: #c22; }
"""
_CELL = 192  # px per image in the grids
RULES = {"plurality": "plurality (Emu §4: majority of the votes, both/neither = tie)",
         "margin": "2-vote margin (Playground v2.5: a win needs 2 more votes than the other side)"}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _ci(ci: Any, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "–"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def ab_summaries(run: Path) -> dict[str, dict]:
    """``{"<candidate>-vs-<baseline>/<criterion>": summary}`` of every A/B round pulled in ``run``."""
    root = EvalLayout(run).ab
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(root.glob("*/*/summary.json"))}


def win_table(run: Path) -> list[dict]:
    """One row per comparison, criterion and rule: win / tie / lose and net win with their CIs."""
    rows = []
    for key, summary in ab_summaries(run).items():
        for rule, s in (summary.get("comparison") or {}).items():
            if s is None:
                continue
            rows.append({"comparison": key, "rule": rule, "pairs": s["n_pairs"], "win": round(s["win"], 3),
                         "tie": round(s["tie"], 3), "lose": round(s["lose"], 3), "net win": round(s["net_win"], 3),
                         "net win 95% CI": _ci(s["ci"].get("net_win")), "sign test p": round(s["sign_test_p"], 4)})
    return rows


def _win_figure(summaries: dict[str, dict], path: Path) -> None:
    """Stacked win / tie / lose bars (A's view) per comparison and rule, the win and lose CIs as error bars."""
    bars = [(f"{key} · {rule}", s) for key, summary in summaries.items()
            for rule, s in (summary.get("comparison") or {}).items() if s]
    fig = Figure(figsize=(9, 0.55 * len(bars) + 1.2))
    ax = fig.subplots()
    for y, (label, s) in enumerate(bars):
        ax.barh(y, s["win"], color="#3a8a4f", label="win" if y == 0 else None)
        ax.barh(y, s["tie"], left=s["win"], color="#bbbbbb", label="tie" if y == 0 else None)
        ax.barh(y, s["lose"], left=s["win"] + s["tie"], color="#c0504d", label="lose" if y == 0 else None)
        if s["ci"].get("win"):
            lo, hi = s["ci"]["win"]
            ax.errorbar(s["win"], y, xerr=[[s["win"] - lo], [hi - s["win"]]], color="black", capsize=3)
        if s["ci"].get("lose"):
            lo, hi = s["ci"]["lose"]
            x = 1 - s["lose"]  # the lose segment's left edge, where the lose share is read off
            ax.errorbar(x, y, xerr=[[hi - s["lose"]], [s["lose"] - lo]], color="black", capsize=3)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of pairs (the first checkpoint's view); error bars: 95% CI over prompts")
    ax.legend(loc="lower right", fontsize=8, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ab_section(summaries: dict[str, dict], out: Path) -> str:
    if not summaries:
        return "<h2>Human A/B rounds</h2><p class=muted>No A/B round has been pulled yet.</p>"
    _win_figure(summaries, out / "win-tie-lose.png")
    parts = ["<h2>Human A/B rounds</h2>", '<img src="win-tie-lose.png" alt="win tie lose bars">']
    for key, summary in summaries.items():
        rows = []
        for rule, s in (summary.get("comparison") or {}).items():
            if s is None:
                rows.append([RULES.get(rule, rule), "no valid vote", *["–"] * 5])
                continue
            tone = "good" if s["ci"].get("net_win") and s["ci"]["net_win"][0] > 0 else (
                "bad" if s["ci"].get("net_win") and s["ci"]["net_win"][1] < 0 else "")
            rows.append([RULES.get(rule, rule), str(s["n_pairs"]), f"{s['win']:.1%} / {s['tie']:.1%} / {s['lose']:.1%}",
                         f"<span class={tone}>{s['net_win']:+.3f}</span>", _ci(s["ci"].get("net_win")),
                         _fmt(s["sign_test_p"], 4), str(s["n_prompts"])])
        agreement = summary.get("agreement") or {}
        consistency = summary.get("repeat_consistency") or {}
        bias = summary.get("position_bias") or {}
        counts = summary.get("counts") or {}
        checks = [
            ["Fleiss' kappa", _fmt(agreement.get("fleiss_kappa")), f"{agreement.get('fleiss_n_items', 0)} pairs"],
            ["swapped repeats voted the same", _fmt(consistency.get("rate")), f"{consistency.get('n', 0)} repeat votes"],
            ["left share of decisive votes", _fmt(bias.get("left_share")), f"p = {_fmt(bias.get('p_value'), 4)} "
             f"({bias.get('n_decisive', 0)} votes)"],
            ["annotators flagged on gold", ", ".join(summary.get("flagged_annotators") or []) or "none",
             "; ".join(f"{html.escape(n)}: {a['n_correct']}/{a['n_gold']}" for n, a in
                       (summary.get("gold_accuracy") or {}).items())],
            ["votes (valid / all)", f"{counts.get('valid', 0)} / {counts.get('votes', 0)}",
             ", ".join(f"{k}: {v}" for k, v in (counts.get("excluded_by_reason") or {}).items()) or "none excluded"],
            ["comparison pairs without a valid vote", str(counts.get("comparison_pairs_without_valid_vote", 0)), ""],
        ]
        parts += [f"<h3>{html.escape(key)} <span class=muted>({summary.get('votes_per_pair')} votes per pair)</span></h3>",
                  _table(["rule", "pairs", "win / tie / lose", "net win", "95% CI", "sign test p", "prompts"], rows),
                  _table(["check on the voters", "value", "detail"], checks)]
    return "\n".join(parts)


def _category_section(summaries: dict[str, dict], judges: dict | None) -> str:
    parts = ["<h2>Per category</h2>"]
    for key, summary in summaries.items():
        rows = [[html.escape(cat), str(s["plurality"]["n_pairs"]), f"{s['plurality']['win']:.1%}",
                 f"{s['plurality']['lose']:.1%}", f"{s['plurality']['net_win']:+.3f}",
                 _ci(s["plurality"]["ci"].get("net_win"))]
                for cat, s in sorted((summary.get("by_category") or {}).items()) if s and s.get("plurality")]
        if rows:
            parts += [f"<h3>A/B {html.escape(key)} (plurality)</h3>",
                      _table(["category", "pairs", "win", "lose", "net win", "95% CI"], rows)]
    if judges and judges.get("per_category"):
        metrics = _judge_metrics(judges)
        rows = []
        for label, cats in judges["per_category"].items():
            for cat, stats in sorted(cats.items()):
                rows.append([html.escape(label), html.escape(cat), *[_fmt(stats[m]["mean"]) for m in metrics]])
        parts += ["<h3>Automatic judges (means over prompts)</h3>", _table(["checkpoint", "category", *metrics], rows)]
    return "\n".join(parts)


def _judge_metrics(judges: dict) -> list[str]:
    first = next(iter(judges["per_checkpoint"].values()))
    return [m for m in first if first[m]["mean"] is not None]


def _judges_section(judges: dict | None) -> str:
    if judges is None:
        return "<h2>Automatic judges</h2><p class=muted>Not run yet.</p>"
    metrics = _judge_metrics(judges)
    rows = [[html.escape(label), *[f"{_fmt(stats[m]['mean'])} {_ci(stats[m]['ci'])}" for m in metrics]]
            for label, stats in judges["per_checkpoint"].items()]
    parts = ["<h2>Automatic judges</h2>",
             f"<p class=muted>{judges.get('images')} images, {judges.get('prompts')} prompts, seeds "
             f"{judges.get('seeds')}; mean over prompts [95% bootstrap CI over prompts].</p>",
             _table(["checkpoint", *metrics], rows)]
    deltas = judges.get("deltas") or {}
    if deltas:
        rows = [[html.escape(pair), *[f"{_fmt(stats[m]['mean'])} {_ci(stats[m]['ci'])}" for m in metrics]]
                for pair, stats in deltas.items()]
        parts += ["<h3>Differences (paired by prompt)</h3>", _table(["difference", *metrics], rows)]
    dist = judges.get("distribution")
    if dist:
        rows = [[html.escape(label), f"{kid['mean']:.4f} ± {kid['std']:.4f}", _fmt((dist.get("fd") or {}).get(label), 1),
                 _fmt((dist.get("cmmd") or {}).get(label))] for label, kid in (dist.get("kid") or {}).items()]
        parts += [f"<h3>Distance to the reference set <span class=muted>({html.escape(json.dumps(dist.get('reference')))})"
                  "</span></h3>", _table(["checkpoint", "KID (lower is closer)", "FD", "CMMD"], rows)]
    skipped = judges.get("skipped") or {}
    if skipped:
        parts.append("<p>Skipped: " + "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in skipped.items())
                     + "</p>")
    return "\n".join(parts)


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _grid(rows: list[tuple[str, list[tuple[str, Path]]]], path: Path) -> None:
    """One row per prompt and seed, one column per image, a caption line above each row."""
    font = _font(13)
    columns = max(len(images) for _, images in rows)
    line = 20
    sheet = Image.new("RGB", (columns * _CELL, len(rows) * (_CELL + 2 * line)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, images) in enumerate(rows):
        top = r * (_CELL + 2 * line)
        draw.text((4, top + 3), caption[: 12 * columns + 40], fill="black", font=font)
        for c, (label, file) in enumerate(images):
            with Image.open(file) as im:
                sheet.paste(im.convert("RGB").resize((_CELL, _CELL)), (c * _CELL, top + line))
            draw.text((c * _CELL + 4, top + line + _CELL + 2), label, fill="#333", font=font)
    sheet.save(path)


def _grids_section(run: Path, out: Path, n: int) -> str:
    manifest = read_manifest(EvalLayout(run).generate).to_pylist()
    labels = list(dict.fromkeys(r[schema.CHECKPOINT] for r in manifest))
    by_key: dict[tuple, dict[str, Path]] = defaultdict(dict)
    text = {}
    for r in manifest:
        key = (r[schema.PROMPT_ID], r[schema.SEED])
        by_key[key][r[schema.CHECKPOINT]] = Path(r[schema.IMAGE_PATH])
        text[key] = f"[{r[schema.CATEGORY]}] {r[schema.PROMPT]} (seed {r[schema.SEED]})"
    keys = list(by_key)[:n]
    rows = [(text[k], [(label, by_key[k][label]) for label in labels]) for k in keys]
    _grid(rows, out / "side-by-side.png")
    return (f"<h2>Side by side</h2><p class=muted>The same prompt and seed for every checkpoint ({', '.join(labels)}); "
            f"the first {len(keys)} of {len(by_key)}.</p><img src=\"side-by-side.png\" alt=\"side by side\">")


def _disagreement_section(run: Path, out: Path, n: int) -> str:
    """The comparison pairs whose valid votes were most split (lowest share for the top answer)."""
    rows, parts = [], ["<h2>Pairs the voters disagreed on most</h2>"]
    for votes_file in sorted(EvalLayout(run).ab.glob("*/*/votes.parquet")):
        pairs = {p["pair_id"]: p for p in pq.read_table(votes_file.parent / "pairs.parquet").to_pylist()}
        counts: dict[str, Counter] = defaultdict(Counter)
        for v in pq.read_table(votes_file).to_pylist():
            if v["exclusion_reason"] is None and v["kind"] == "comparison":
                counts[v["pair_id"]][v["raw_choice"]] += 1
        split = sorted(((max(c.values()) / sum(c.values()), pid) for pid, c in counts.items() if sum(c.values()) > 1))
        for share, pid in split[:n]:
            pair = pairs[pid]
            left, right = ("image_a", "image_b") if pair["left"] == "a" else ("image_b", "image_a")
            name = f"{votes_file.parent.parent.name}/{votes_file.parent.name}"
            caption = (f"{name}: \"{pair['prompt']}\" votes {dict(counts[pid])} (left = {pair['checkpoint_' + pair['left']]})")
            rows.append((caption, [("left", Path(pair[left])), ("right", Path(pair[right]))]))
    if not rows:
        return parts[0] + "<p class=muted>No pair with two or more valid votes.</p>"
    _grid(rows, out / "disagreements.png")
    return parts[0] + '<img src="disagreements.png" alt="most disputed pairs">'


def build_report(run: Path, n_grid: int = 8, n_disputed: int = 4) -> Path:
    """Write ``RUN/report/index.html`` (and its PNGs) from the run's files; returns its path."""
    layout = EvalLayout(Path(run))
    if not layout.manifest.is_file():
        raise EvaluationError(f"no generations in {layout.generate}: run the generate stage first")
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    judges = json.loads(layout.judges_summary.read_text()) if layout.judges_summary.is_file() else None
    summaries = ab_summaries(layout.run)
    body = "\n".join([
        f"<h1>Evaluation: {html.escape(layout.run.name)}</h1>",
        "<p class=muted>Did quality-tuning help? Human A/B verdicts first (the measurement), then the automatic "
        "judges (proxies).</p>",
        _ab_section(summaries, out),
        _category_section(summaries, judges),
        _judges_section(judges),
        _grids_section(layout.run, out, n_grid),
        _disagreement_section(layout.run, out, n_disputed),
    ])
    index = out / "index.html"
    index.write_text(f"<!doctype html><meta charset=utf-8><title>needles evaluation</title><style>{_STYLE}</style>"
                     f"\n{body}\n")
    return index
