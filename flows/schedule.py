"""Serve the retrain flow as a Prefect deployment on the pipeline's cron schedule.

    make schedule        # starts a local Prefect server, then runs this file
    python -m flows.schedule --pipeline pipelines/tiny-cpu.yaml     # from the project root

The deployment is named after the pipeline (`retrain/tiny-cpu`); `prefect deployment ls` lists
it and `prefect deployment run retrain/tiny-cpu` triggers a run now. One run of a deployment at
a time (global_limit=1): a second trigger waits in the queue instead of training in parallel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.retrain import in_project
from phi3ops.config import ProjectPaths, load_config
from phi3ops.errors import Phi3opsError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/tiny-cpu.yaml")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args(argv)
    paths = ProjectPaths(args.root)
    try:
        cfg = load_config(paths.pipeline(args.pipeline), root=paths.root)
    except Phi3opsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    in_project(paths.root).serve(
        name=cfg.name,
        cron=cfg.schedule,  # None: no schedule, runs only when triggered
        parameters={"pipeline": args.pipeline, "root": str(paths.root)},
        global_limit=1,
        tags=["phi3ops", cfg.name],
        description=f"Retrain {cfg.model.name_or_path} on {cfg.data.path} ({args.pipeline})",
    )


if __name__ == "__main__":
    main()
