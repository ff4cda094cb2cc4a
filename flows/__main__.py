"""``python -m flows <serve|relay|up|down|where>``

serve   serve the deployments curate/quality-set and train-qt/train-qt (a long-running process)
relay   resume suspended curate runs when their annotation round completes (a long-running process)
up      start the local stack: Prefect server, serve, relay, Label Studio (PID files in .run/)
down    stop all of them by PID
where   print where the latest curated set, report and checkpoint are
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def serve() -> None:
    from prefect import serve as prefect_serve

    from flows.curate import curate
    from flows.train import train_qt

    prefect_serve(
        curate.to_deployment(
            name="quality-set",
            parameters={"sources": ["data/sample"], "run_dir": "data/runs/quality-set"},
            description="Emu-style curation: automatic filters -> pool -> generalist -> specialist -> curated set",
        ),
        train_qt.to_deployment(name="train-qt", description="quality-tune the LDM on the latest curated set"),
    )


def where(root: Path = Path("data")) -> None:
    def newest(pattern: str) -> str:
        found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        return str(found[-1]) if found else "(none yet)"

    print(f"curated set:  {newest('**/annotation/curated')}")
    print(f"report:       {newest('**/report/index.html')}")
    print(f"checkpoint:   {newest('**/train-qt/**/model_index.json').rsplit('/', 1)[0]}")
    print(f"sample grids: {newest('**/train-qt/**/samples/*.png')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "relay", "up", "down", "where"])
    parser.add_argument("--no-labelstudio", action="store_true", help="up/down: leave Label Studio alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from flows import stack

    if args.command == "serve":
        serve()
    elif args.command == "relay":
        from flows.relay import run_forever

        run_forever()
    elif args.command == "up":
        stack.up(with_labelstudio=not args.no_labelstudio)
    elif args.command == "down":
        stack.down(with_labelstudio=not args.no_labelstudio)
    else:
        where()
    return 0


if __name__ == "__main__":
    sys.exit(main())
