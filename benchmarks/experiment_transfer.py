"""Transfer diagnostics of an experiment's expert methods without the evaluation.

Runs the experiment's stages up to the vector fits (capture, alignments, every method's
vectors; not `evaluate`) into its run directories and prints, per task, the transfer table the
report shows (`expertsteer.evaluation.report.transfer_section`, from each method's steering
metadata). Stages run whether or not `stages.json` has them: a later `expertsteer run` reruns
them once. Use it to re-measure the diagnostics of a run whose evaluation is not needed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/experiment_transfer.py \
        configs/experiments/default.yaml --out runs/default_transfer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from expertsteer.artifacts import STEERING_FILE
from expertsteer.evaluation.report import transfer_section
from expertsteer.evaluation.transfer import transfer_summary
from expertsteer.method.vectors import load_steering
from expertsteer.pipeline import stages
from expertsteer.pipeline.experiment import check, load_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="experiment YAML")
    parser.add_argument("--out", type=Path, help="JSON of every task's transfer entries")
    args = parser.parse_args()
    experiment = load_experiment(args.config)
    check(experiment)
    results = {}
    for task in experiment.tasks:
        settings = experiment.for_task(task)
        run_dir = settings.run_dir(task)
        started = time.perf_counter()
        for stage, (command, config, _) in stages.stage_configs(settings, task).items():
            if stage != "evaluate":
                path = run_dir / "stages" / f"{stage}.yaml"
                stages._run_one(settings, task, stage, command, path, config, f"[{task}] {stage}")
        metadata = {
            method: load_steering(stages.method_dir(run_dir, method) / STEERING_FILE).metadata
            for method in settings.methods
        }
        summary = transfer_summary(metadata)
        results[task] = {"seconds": round(time.perf_counter() - started), "transfer": summary}
        print(f"\n### {task} ({results[task]['seconds']} s)\n")
        print("\n".join(transfer_section({"transfer": summary})[2:]), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
