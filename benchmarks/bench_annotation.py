"""Annotation throughput against a real Label Studio (started here, fresh data dir, stopped by PID).

1. push_round of a 200,000-row pool (thumbnail files written + tasks imported in 10K batches): goal 90 s
2. pull_round + decide_round of 20,000 annotations (10,000 tasks x 2 annotators): goal 60 s

Run:  .venv/bin/python benchmarks/bench_annotation.py [--pool-size 200000] [--annotations 20000]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from annotation.client import LabelStudioClient, LabelStudioSettings
from annotation.curation import decide_round, image_dir, project_prefix, pull_round, push_round
from annotation.rounds import get_round
from pipeline import schema

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "needles-bench-token-7f3e"


def synthetic_pool(n: int, path: Path) -> None:
    """n rows with unique ids and one small real JPEG as thumbnail (the push cost is per task, not per pixel)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(buf, "JPEG")
    thumb = buf.getvalue()
    ids = [f"{i:064x}" for i in range(n)]
    table = pa.table(
        {
            schema.ID: ids,
            schema.CAPTION: [f"photo {i}" for i in range(n)],
            schema.THUMBNAIL: pa.array([thumb] * n, pa.binary()),
            schema.AESTHETIC_SCORE: np.random.default_rng(1).uniform(4, 8, n),
        }
    )
    pq.write_table(table, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool-size", type=int, default=200_000)
    parser.add_argument("--annotations", type=int, default=20_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-annotation-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LABEL_STUDIO_STATE_DIR": str(tmp / "ls"), "LABEL_STUDIO_PORT": str(port),
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(tmp / "files"), "LABEL_STUDIO_USER_TOKEN": TOKEN}
    subprocess.run([ROOT / "annotation/labelstudio/start.sh"], env=env, check=True)
    try:
        settings = LabelStudioSettings(url=f"http://127.0.0.1:{port}", api_key=TOKEN, document_root=tmp / "files")
        generalist = get_round("generalist")

        pool = tmp / "pool.parquet"
        synthetic_pool(args.pool_size, pool)
        t = time.perf_counter()
        pushed = push_round(pool, generalist, "bench", tmp / "work", settings)
        push_s = time.perf_counter() - t
        assert pushed.created == args.pool_size

        # 2 annotators' answers imported with their tasks (creating 20K annotations one by one through
        # the API would measure the setup, not the pull)
        client = LabelStudioClient(settings)
        second = client.as_user(client.ensure_annotator("b@bench.local", "bench-password-1"))
        users = [client.whoami().id, second.whoami().id]
        n_tasks = args.annotations // 2
        small = tmp / "small.parquet"
        pq.write_table(pq.read_table(pool).slice(0, n_tasks), small)
        round_ = get_round("generalist", target_size=n_tasks // 4)
        pid = client.ensure_project(f"{project_prefix('pullbench', generalist)}1", generalist.label_config,
                                    generalist.guideline, 2, "bench")
        client.ensure_local_storage(pid, image_dir(settings, "pullbench", generalist))
        ids = pq.read_table(small, columns=[schema.ID])[schema.ID].to_pylist()
        rng = np.random.default_rng(2)
        tasks = [
            {"data": {"pool_id": i, "image": "/data/local-files/?d=x.jpg", "caption": "", "preload": ""},
             "annotations": [{"completed_by": u, "lead_time": 2.0,
                              "result": generalist.result_from_answers({"decision": "keep" if rng.random() < 0.3 else "reject"})}
                             for u in users]}
            for i in ids
        ]
        for start in range(0, len(tasks), 5_000):
            client.sdk.projects.import_tasks(pid, request=tasks[start:start + 5_000])
        t = time.perf_counter()
        table = pq.read_table(pull_round(round_, "pullbench", tmp / "work", settings))
        pull_s = time.perf_counter() - t
        decide_round(round_, small, tmp / "work")
        pull_decide_s = time.perf_counter() - t
        assert table.num_rows == args.annotations, table.num_rows
    finally:
        subprocess.run([ROOT / "annotation/labelstudio/stop.sh"], env=env, check=True)

    print(f"push {args.pool_size} tasks: {push_s:.1f} s ({args.pool_size / push_s:,.0f} tasks/s); "
          f"goal 90 s -> time/goal {push_s / 90:.2f}")
    print(f"pull {args.annotations} annotations: {pull_s:.1f} s; pull+decide {pull_decide_s:.1f} s; "
          f"goal 60 s -> time/goal {pull_decide_s / 60:.2f}")


if __name__ == "__main__":
    main()
