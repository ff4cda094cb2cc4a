"""Flow ``train-qt`` (deployment ``train-qt``): quality-tune the model on a curated set (pretraining
first when no base checkpoint exists), wrapping model.train.train_quality_tuned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact

from flows.lock import run_dir_lock
from flows.params import TrainParams, data_root, flow_parameters


def latest_curated(root: Path | None = None) -> Path:
    """The newest curated set under ``root`` (default: the data root; ``.../annotation/curated`` written by
    the curate flow)."""
    root = data_root() if root is None else root
    candidates = [p.parent for p in root.glob("**/curated/metadata.jsonl")]
    if not candidates:
        raise FileNotFoundError(
            f"no curated set under {root}/ (run the curate flow or `make demo` first, or pass data_dir)"
        )
    return max(candidates, key=lambda p: (p / "metadata.jsonl").stat().st_mtime)


@flow(name="train-qt", log_prints=True)
@flow_parameters(TrainParams)
def train_qt(**values: Any) -> dict:
    """Quality-tune on a curated set (flows/params.py: TrainParams)."""
    params = TrainParams.parse(values)
    from model.train import train_quality_tuned

    data = Path(params.data_dir) if params.data_dir else latest_curated()
    with run_dir_lock(params.out_dir):
        result = train_quality_tuned(data, Path(params.out_dir), params.preset, overrides=params.overrides,
                                     progress=False)
    from model.export import write_lineage

    for folder in {f for f in (result.checkpoint, result.stages[-1].final) if f.is_dir()}:  # curated set and config
        write_lineage(folder, data, Path(params.out_dir) / "config.yaml")
    create_link_artifact(Path(result.checkpoint).resolve().as_uri(), link_text="quality-tuned pipeline",
                         key="checkpoint")
    summary = {"data": str(data), "checkpoint": str(result.checkpoint), "base": str(result.base),
               "grids": [str(g) for g in result.grids]}
    print(f"checkpoint: {result.checkpoint}")
    for grid in result.grids:
        print(f"sample grid: {grid}")
    return summary
