"""How far a conditioned method's coefficients move between the capture dtype its reader was
fitted on and the float32 read at evaluation.

A reader (u, m, s, or the multinomial probe) is fitted on the run's captured states of the steer
split, in the capture dtype (`alignment.model_dtype`; bfloat16 in
configs/experiments/expert_conditioned.yaml). At evaluation the reader model reads each input
in the scoring dtype (float32). This reads the steer split's prompts both ways at the reader's
block and prints: the agreement of the two reads' scores (correlation; mean and largest shift
in units of s, the half-distance of the class means), how many reads change the reader's
answer, and the mean |coefficient difference| at the run's chosen c_max.

    python benchmarks/reader_dtype.py runs/expert_conditioned/sst2 --method expert_conditioned
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from expertsteer.data.catalogue import resolve_task
from expertsteer.data.prompts import class_items
from expertsteer.data.splits import SplitSizes, make_splits
from expertsteer.data.tasks import load_task
from expertsteer.method.conditioned import READER_FILE, load_reading
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model
from expertsteer.pipeline.stages import method_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (metrics.json)")
    parser.add_argument("--method", default="expert_conditioned")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    stage = args.run / "stages" / f"vectors_{args.method}.yaml"
    data = yaml.safe_load(stage.read_text())["data"]["init_args"]  # item_kind: classes
    fitted_dtype = data.get("model_dtype", "auto")
    metrics = json.loads((args.run / "metrics.json").read_text())
    entry = metrics["methods"][args.method]
    reading = load_reading(method_dir(args.run, args.method) / READER_FILE)
    layer = int(reading.metadata["layer"])
    reader = data["expert"] if entry["reader"] == "expert" else data["target"]
    task = load_task(resolve_task(data["task"]), data["data_root"])
    sizes = SplitSizes(**{k: data[f"{k}_size"] for k in ("steer", "dev", "test")})
    steer = make_splits(task, sizes, data["seed"])["steer"]
    prompts = [item.prompt for item in class_items(task, steer)]

    reads = {}
    for dtype in (fitted_dtype, "float32"):
        decoder = CausalLM.from_loaded(load_model(reader, dtype))
        states = capture(decoder, prompts, [layer], "last", batch_size=8)[layer]
        reads[dtype] = reading.scores(states.float())
    fitted, evaluated = reads[fitted_dtype], reads["float32"]
    result = {
        "run": str(args.run),
        "method": args.method,
        "reader": reader,
        "layer": layer,
        "items": len(prompts),
        "fitted_dtype": fitted_dtype,
        # The reader's own record of the steer scores (what m and s were computed from).
        "recorded_vs_fitted_max_abs": float((reading.steer_scores - fitted).abs().max()),
    }
    if reading.classes == 2:
        shift = (evaluated - fitted)[:, 0] / reading.half
        result |= {
            "correlation": float(
                torch.corrcoef(torch.stack([fitted[:, 0], evaluated[:, 0]]))[0, 1]
            ),
            "mean_shift_in_s": float(shift.mean()),
            "max_abs_shift_in_s": float(shift.abs().max()),
        }
    answers = reading.predict(fitted) != reading.predict(evaluated)
    coefficients = [reading.coefficients(r, entry["c_max"]) for r in (fitted, evaluated)]
    result |= {
        "answers_changed": int(answers.sum()),
        "c_max": entry["c_max"],
        "mean_abs_coefficient_difference": float((coefficients[0] - coefficients[1]).abs().mean()),
        "mean_abs_coefficient": float(coefficients[1].abs().mean()),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
