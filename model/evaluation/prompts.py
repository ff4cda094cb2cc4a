"""Prompt sets for evaluation: PartiPrompts and DrawBench (shipped in ``prompt_sets/``, see SOURCES.md) or
a user's file, sampled equally per category.

Emu §4 evaluates on PartiPrompts (1,632 prompts, 12 categories) and its own Open User Input set;
DrawBench is Imagen's (Saharia et al. 2022) 200 prompts in 11 categories. ``split_prompts`` keeps the
prompts that choose a checkpoint (early stopping) apart from the ones whose results are reported
(issue 10, item 6), so the reported numbers are not selected on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.evaluation import schema
from model.evaluation.errors import EvaluationError

log = logging.getLogger(__name__)

PROMPT_SETS = Path(__file__).resolve().parent / "prompt_sets"
#: the shipped sets by name: file, and the source name their prompt ids start with
BUILTIN = {"parti": PROMPT_SETS / "PartiPrompts.tsv", "drawbench": PROMPT_SETS / "DrawBench.csv"}
PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "text")
CATEGORY_COLUMNS = ("category", "Category")
SUFFIXES = (".tsv", ".csv", ".txt", ".parquet", ".jsonl")


#: written by training beside every exported checkpoint whose choice used sample.score's prompts
SELECTION_FILE = "needles_selection_prompts.json"


def load_prompts(source: str | Path, n: int | None = None, per_category: int | None = None,
                 categories: list[str] | None = None, seed: int = 0, exclude: Collection[str] = ()) -> pa.Table:
    """Prompts of ``source`` ("parti", "drawbench" or a .tsv/.csv/.txt/.parquet/.jsonl file) as a
    PROMPTS_SCHEMA table in file order. ``exclude`` (prompt texts) drops those first, e.g. the ones that
    chose a checkpoint (``selection_prompts``). ``categories`` keeps only those; ``per_category`` takes at most
    that many of each category; ``n`` then takes n in all, spread equally over the categories (a
    category with fewer gives all it has). Sampling is seeded; the same prompt text always gets the same
    ``prompt_id``: "<source>-<first 10 hex of its sha256>"."""
    path, name = (BUILTIN[source], source) if str(source) in BUILTIN else (Path(source), _source_name(Path(source)))
    prompts, cats = _read(path)
    keep = [i for i, p in enumerate(prompts) if p and p.strip()]
    if len(keep) < len(prompts):
        log.warning("%s: %d rows with an empty prompt are not prompts; skipped", path, len(prompts) - len(keep))
    excluded = {p.strip() for p in exclude}
    if excluded:
        before = len(keep)
        keep = [i for i in keep if prompts[i].strip() not in excluded]
        log.info("%s: %d rows left out (prompts that chose a checkpoint)", path, before - len(keep))
        if not keep:
            raise EvaluationError(f"{path}: every prompt is excluded (they chose a checkpoint); use another prompt set")
    table = {}
    for i in keep:  # the same text twice is one prompt (one id): keep its first row
        table.setdefault(prompts[i].strip(), (cats[i] or "").strip() or schema.UNCATEGORIZED)
    if len(table) < len(keep):
        log.info("%s: %d repeated prompts counted once", path, len(keep) - len(table))
    rows = pa.table({
        schema.PROMPT_ID: [f"{name}-{hashlib.sha256(p.encode()).hexdigest()[:10]}" for p in table],
        schema.PROMPT: list(table),
        schema.CATEGORY: list(table.values()),
    }, schema=schema.PROMPTS_SCHEMA)
    if categories is not None:
        unknown = sorted(set(categories) - set(table.values()))
        if unknown:
            raise EvaluationError(f"{path}: no prompts in categories {unknown}; its categories: {sorted(set(table.values()))}")
        rows = rows.filter(pa.array([c in categories for c in table.values()]))
    if per_category is not None or n is not None:
        rows = rows.take(sorted(_balanced_sample(rows.column(schema.CATEGORY).to_pylist(), n, per_category, seed)))
    return rows


def selection_prompts(checkpoints: Iterable[str | Path]) -> dict[str, list[str]]:
    """{checkpoint: prompt texts that chose it}: read from the SELECTION_FILE training wrote beside each
    checkpoint picked on sample.score (empty for the others). The evaluation stage leaves these out."""
    out = {}
    for checkpoint in checkpoints:
        file = Path(checkpoint) / SELECTION_FILE
        if file.is_file():
            out[str(checkpoint)] = json.loads(file.read_text())["prompts"]
    return out


def split_prompts(table: pa.Table, n_select: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(selection, report): ``n_select`` prompts (balanced over categories, seeded) that choose the best
    checkpoint, and the disjoint rest on which it is reported (issue 10 item 6: choosing and reporting
    on the same prompts would flatter the chosen checkpoint)."""
    if not 0 < n_select < table.num_rows:
        raise EvaluationError(f"split_prompts: n_select must be between 1 and {table.num_rows - 1} "
                              f"(both sets non-empty), got {n_select}")
    chosen = set(_balanced_sample(table.column(schema.CATEGORY).to_pylist(), n_select, None, seed))
    return (table.take(sorted(chosen)),
            table.take([i for i in range(table.num_rows) if i not in chosen]))


def _balanced_sample(categories: list[str], n: int | None, per_category: int | None, seed: int) -> list[int]:
    """Row indices: each category's rows in a seeded order, cut to ``per_category``, then taken one per
    category in turn (categories in a seeded order too) until ``n``: equal shares, and a category with
    fewer rows gives all it has."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_category.setdefault(c, []).append(i)
    queues = [list(rng.permutation(rows)[:per_category]) for _, rows in sorted(by_category.items())]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    total = sum(len(q) for q in queues)
    n = total if n is None else min(n, total)
    picked: list[int] = []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def _source_name(path: Path) -> str:
    """The file's stem as an id prefix: lower case, only characters that are safe in a file name."""
    return re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "prompts"


def _read(path: Path) -> tuple[list[str | None], list[str | None]]:
    """(prompts, categories) of a prompt file; categories are None where the file has none."""
    if not path.is_file():
        raise EvaluationError(f"prompt file {path} does not exist (built-in sets: {sorted(BUILTIN)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EvaluationError(f"prompt file {path}: unknown format {suffix!r}; use one of {list(SUFFIXES)}")
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return lines, [None] * len(lines)
    table = _read_table(path, suffix)
    prompt = next((c for c in PROMPT_COLUMNS if c in table.column_names), None)
    if prompt is None:
        raise EvaluationError(f"prompt file {path} has no prompt column (one of {list(PROMPT_COLUMNS)}); "
                              f"its columns: {table.column_names}")
    category = next((c for c in CATEGORY_COLUMNS if c in table.column_names), None)
    prompts = table.column(prompt).cast(pa.string()).to_pylist()
    cats = table.column(category).cast(pa.string()).to_pylist() if category else [None] * len(prompts)
    return prompts, cats


def _read_table(path: Path, suffix: str) -> pa.Table:
    import pyarrow.csv as csv
    import pyarrow.parquet as pq

    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix == ".jsonl":
            return pa.Table.from_pylist([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
        # PartiPrompts' TSV quotes nothing and has prompts with '"' inside: only CSV gets quote handling
        options = csv.ParseOptions(delimiter="\t", quote_char=False) if suffix == ".tsv" else csv.ParseOptions()
        return csv.read_csv(path, parse_options=options)
    except (pa.ArrowInvalid, json.JSONDecodeError, OSError) as error:
        raise EvaluationError(f"prompt file {path} does not parse as {suffix[1:]}: {error}") from error
