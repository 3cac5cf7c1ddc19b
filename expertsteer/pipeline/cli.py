"""Command-line entry point: `expertsteer <command>` or `python -m expertsteer <command>`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING

from expertsteer import __version__
from expertsteer.artifacts import METRICS_FILE, load_json
from expertsteer.errors import ExpertSteerError
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET
from expertsteer.pipeline.console import configure_logging
from expertsteer.pipeline.lightning_cli import LIGHTNING_COMMANDS, hide_library_bars, run_stage

if TYPE_CHECKING:
    from expertsteer.data.tasks import Task

log = logging.getLogger("expertsteer")

PIPELINE_MODULES = {
    "lightning",
    "torchmetrics",
    "datasets",
    "jsonargparse",
    "matplotlib",
    "vaderSentiment",
}
"""Top-level modules of the `pipeline` extra (the Lightning stages, tasks, figures)."""
SMOKE_QUESTION = "What is the capital of France?"
SMOKE_PROMPTS = [
    SMOKE_QUESTION,
    "Write a Python function that returns the sum of a list.",
    "Is the sentence 'I loved this film' positive or negative?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
]


def _models(_: argparse.Namespace) -> None:
    from expertsteer.cache import cache_dir
    from expertsteer.models.zoo import MANIFEST, PACKAGED

    print(f"{'name':30} {'arch':12} {'d':>5} {'layers':>6}  installed  converted")
    for spec in PACKAGED.values():
        installed = "yes" if not spec.missing_packages() else "no"
        converted = "yes" if (cache_dir() / "models" / spec.name / MANIFEST).is_file() else "no"
        print(
            f"{spec.name:30} {spec.architecture:12} {spec.hidden_size:>5} "
            f"{spec.num_layers:>6}  {installed:9}  {converted}"
        )
    print(f"\ncache: {cache_dir()}  (set EXPERTSTEER_CACHE to move it)")


def _prepare(args: argparse.Namespace) -> None:
    from expertsteer.models.zoo import load_model

    for name in args.names:
        started = time.perf_counter()
        loaded = load_model(name)
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s at {loaded.path}")


def _generate(args: argparse.Namespace) -> None:
    from expertsteer.models.causal_lm import CausalLM
    from expertsteer.models.zoo import load_model

    if args.steer is not None:
        _generate_steered(args)
        return
    if args.model is None:
        raise ExpertSteerError("give --model (or --steer RUN_DIR to try a run's vectors)")
    decoder = CausalLM.from_loaded(load_model(args.model, dtype=args.dtype), args.chat_template)
    for prompt, answer in zip(
        args.prompt, decoder.generate(args.prompt, args.max_new_tokens), strict=True
    ):
        print(f"> {prompt}\n{answer.strip()}\n")


def _generate_steered(args: argparse.Namespace) -> None:
    import textwrap

    from expertsteer.pipeline.try_steering import RunSteering

    steering = RunSteering.load(args.steer, args.method, args.alpha)
    label = f"steered ({steering.method}, alpha {steering.alpha:g}, layers {steering.layers})"
    width = max(len("unsteered"), len(label))
    pairs = steering.compare(args.prompt, args.max_new_tokens)
    for prompt, (plain, steered) in zip(args.prompt, pairs, strict=True):
        print(f"> {prompt}")
        for name, text in (("unsteered", plain), (label, steered)):
            lines = textwrap.wrap(" ".join(text.split()), max(40, 100 - width)) or ["(empty)"]
            print(f"  {name:{width}}  {lines[0]}")
            for line in lines[1:]:
                print(f"  {'':{width}}  {line}")
        print()


def _tasks(args: argparse.Namespace) -> None:
    from expertsteer.data.catalogue import catalogue
    from expertsteer.data.tasks import resolve_data_root

    root = resolve_data_root(args.data_root)
    if args.check:
        _check_task(args.check, root)
        return
    print(f"{'task':22} {'type':15} {'pools':34} source")
    for entry in catalogue(root):
        pools = ", ".join(f"{pool} {n}" for pool, n in entry.pools.items()) or "-"
        print(f"{entry.name:22} {entry.type:15} {pools:34} {entry.source}")
    print(f"\ndata root: {root}  (set --data-root or EXPERTSTEER_DATA to move it)")


def _check_task(path: str, data_root: str) -> None:
    from collections import Counter

    from expertsteer.data.prompts import answer_text, render_prompt
    from expertsteer.data.tasks import load_task, spec_from_yaml

    spec = spec_from_yaml(path)
    task = load_task(spec, data_root)
    if task.type == "behaviour":
        _check_behaviour_task(task, spec.scorer)
        return
    examples = task.all_examples()
    pools = ", ".join(f"{pool} {len(rows)}" for pool, rows in task.pools.items())
    dropped = sum(task.dropped.values())
    print(f"task '{task.name}' ({task.type}): {len(examples)} examples ({pools})", end="")
    print(f", {dropped} rows dropped" if dropped else "")
    for example in examples[:3]:
        print(f"\n--- {example.id}\n{render_prompt(task.type, example)}")
        if example.answer is not None:
            print(f"=> {answer_text(task.type, example, example.answer)}")
    _check_duplicates(task)
    if task.type == "numeric":
        return
    counts = Counter(example.answer for example in examples)
    names = {e.answer: answer_text(task.type, e, e.answer) for e in examples if e.choices}
    print("\nlabel balance:")
    for answer, count in sorted(counts.items()):
        name = names.get(answer, str(answer)) if task.type != "choice" else f"option {answer}"
        print(f"  {name:20} {count:6}  {count / len(examples):6.1%}")
    if len(counts) == 1:
        print(
            "\nwarning: every example has the same gold answer; a constant answer scores 100%, "
            "so no steering gain can be measured on this task (add examples of other classes)"
        )


def _check_duplicates(task: Task) -> None:
    """Rows the splits will leave out as duplicates, per pool, with contradicting texts named."""
    from expertsteer.data.splits import find_duplicates

    for pool, examples in task.pools.items():
        found = find_duplicates(examples)
        if not found.dropped:
            continue
        print(
            f"\npool '{pool}': {found.repeated} repeated rows (kept once) and "
            f"{found.contradicting_rows} rows of {len(found.contradicting)} texts with "
            "contradicting gold answers (left out) will not enter the splits"
        )
        for text in found.contradicting[:10]:
            print(f"  contradicting: {text[:120]!r}")
        if len(found.contradicting) > 10:
            print(f"  ... and {len(found.contradicting) - 10} more")


def _check_behaviour_task(task, scorer: str) -> None:
    """`tasks --check` of a behaviour task: its pools, concept label balance and prompts."""
    concept, prompts = task.pools["concept"], task.pools["prompts"]
    positive = sum(example.answer == 1 for example in concept)
    print(
        f"task '{task.name}' (behaviour, scorer {scorer}): {len(concept)} concept texts "
        f"({positive} label 1, {len(concept) - positive} label 0), {len(prompts)} prompts"
    )
    for example in concept[:2] + prompts[:3]:
        kind = "prompt" if example.answer is None else f"concept, label {example.answer}"
        print(f"\n--- {example.id} ({kind})\n{example.question}")


def _smoke_test(args: argparse.Namespace) -> None:
    from expertsteer.models.capture import capture
    from expertsteer.models.causal_lm import CausalLM
    from expertsteer.models.zoo import load_model

    for role, name in (("expert", args.expert), ("target", args.target)):
        started = time.perf_counter()
        decoder = CausalLM.from_loaded(load_model(name))
        loaded_s = time.perf_counter() - started
        answer = decoder.generate([SMOKE_QUESTION], max_new_tokens=24)[0].strip()
        started = time.perf_counter()
        states = capture(decoder, SMOKE_PROMPTS, position="last")
        capture_s = time.perf_counter() - started
        norms = [f"{states[layer].norm(dim=-1).mean():.1f}" for layer in sorted(states)]
        print(
            f"\n[{role}] {name}: {decoder.num_layers} layers, d={decoder.hidden_size}, "
            f"ready in {loaded_s:.1f} s"
        )
        print(f"  > {SMOKE_QUESTION}\n  {answer}")
        print(
            f"  captured last-token states of {len(SMOKE_PROMPTS)} prompts at every layer in "
            f"{capture_s:.2f} s; mean residual norm per layer:\n  {' '.join(norms)}"
        )


def _run(args: argparse.Namespace) -> None:
    from expertsteer.evaluation.report import REPORT_FILE
    from expertsteer.pipeline.experiment import load_experiment, split_plan
    from expertsteer.pipeline.stages import plan, run_experiment, validate_stage_configs

    experiment = load_experiment(args.config)
    if args.task:
        missing = [task for task in args.task if task not in experiment.tasks]
        if missing:
            raise ExpertSteerError(f"--task {missing} not in the experiment's tasks")
        experiment.tasks = list(args.task)
    if args.dry_run:
        for task in experiment.tasks:
            validate_stage_configs(experiment, task)
        for task in experiment.tasks:
            print("\n".join(split_plan(experiment.for_task(task), task)))
        for task in experiment.tasks:
            for stage, command, path, _, reuse in plan(experiment, task):
                state = "reuse" if reuse and not args.force else "run"
                print(f"{task:24} {stage:30} {state:6} expertsteer {command} --config {path}")
        return
    started = time.perf_counter()
    run_dirs = run_experiment(experiment, force=args.force)
    for task, run_dir in run_dirs.items():
        metrics = load_json(run_dir / METRICS_FILE, "metrics")
        print(f"\n## {task} (test n={metrics['n_test']}, dev n={metrics['n_dev']})\n")
        print(_table(metrics))
        print(f"\nreport: {run_dir / REPORT_FILE}")
    print(f"\nexperiment '{experiment.name}' finished in {time.perf_counter() - started:.0f} s")


def _table(metrics: dict) -> str:
    """The summary table of a run: the behaviour table for a behaviour task."""
    if metrics.get("task_type") == "behaviour":
        from expertsteer.evaluation.behaviour_report import behaviour_table

        return behaviour_table(metrics)
    from expertsteer.evaluation.report import summary_table

    return summary_table(metrics)


def _export_gguf(args: argparse.Namespace) -> None:
    from pathlib import Path

    from expertsteer.artifacts import STEERING_FILE
    from expertsteer.method.vectors import load_steering
    from expertsteer.models.export import export_gguf
    from expertsteer.pipeline.experiment import METHODS
    from expertsteer.pipeline.stages import current_metrics, method_dir

    run = Path(args.run_dir)
    if args.method not in METHODS:
        raise ExpertSteerError(f"unknown method '{args.method}'; choose from {list(METHODS)}")
    source = method_dir(run, args.method) if run.is_dir() else run
    alpha = args.alpha
    steering_file = source / STEERING_FILE
    recorded = steering_file.is_file() and load_steering(steering_file).choice is not None
    if alpha is None and not recorded and run.is_dir() and (run / METRICS_FILE).is_file():
        # A run evaluated before the vectors recorded their choice.
        entry = current_metrics(run, alpha_option=True)["methods"].get(args.method)
        alpha = None if entry is None else entry["alpha"]
        if alpha is not None:
            log.info("alpha %g: chosen on dev for %s (metrics.json)", alpha, args.method)
    path = export_gguf(source, args.out, alpha=alpha, model_hint=args.model_hint)
    print(f"control vector written to {path}")


def _report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from expertsteer.evaluation.report import write_report
    from expertsteer.pipeline.stages import current_metrics

    metrics = current_metrics(Path(args.run_dir))
    if metrics.get("task_type") == "behaviour":
        from expertsteer.evaluation.behaviour_report import write_behaviour_report

        path = write_behaviour_report(args.run_dir, metrics)
    else:
        path = write_report(args.run_dir, metrics)
    print(_table(metrics))
    print(f"\nreport: {path}")


def _alpha(text: str) -> float:
    """An argparse type: a finite strength within the evaluation's bound."""
    from expertsteer.method.vectors import check_alpha

    try:
        return check_alpha(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


Commands = argparse._SubParsersAction
"""The `expertsteer` subcommand group each `_add_*` adds its command to."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertsteer",
        description="Steer a target LLM with steering vectors derived from an expert model.",
        epilog=(
            "Lightning stages: `expertsteer fit --config configs/align.yaml`, "
            "`expertsteer fit --config configs/rfm.yaml`, `expertsteer validate ...` "
            "(run `expertsteer fit --help` for every option)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="every log line on the console (default: stage headers, warnings and the summary; "
        "the rest is in <run>/logs/run.log)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `--help` lists the commands in this order.
    _add_models(commands)
    _add_prepare(commands)
    _add_generate(commands)
    _add_tasks(commands)
    _add_smoke_test(commands)
    _add_run(commands)
    _add_report(commands)
    _add_export_gguf(commands)
    return parser


def _add_models(commands: Commands) -> None:
    models = commands.add_parser("models", help="list the packaged models and their state")
    models.set_defaults(handler=_models)


def _add_prepare(commands: Commands) -> None:
    prepare = commands.add_parser(
        "prepare", help="convert packaged models (or .gguf files) into the cache once"
    )
    prepare.add_argument("names", nargs="+", metavar="MODEL")
    prepare.set_defaults(handler=_prepare)


def _add_generate(commands: Commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="greedy answers from one model, or unsteered and steered answers of a run's target",
    )
    generate.add_argument("--model", help="packaged name, directory, .gguf or id")
    generate.add_argument(
        "--steer", metavar="RUN_DIR", help="a run directory: its target, unsteered and steered"
    )
    generate.add_argument(
        "--method", default="expertsteer", help="with --steer: whose vectors (default expertsteer)"
    )
    generate.add_argument(
        "--alpha", type=_alpha, help="with --steer: strength (default: chosen on dev)"
    )
    generate.add_argument("--prompt", required=True, action="append", help="repeatable")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32)
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    generate.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the chat template (default: when the tokenizer has one)",
    )
    generate.set_defaults(handler=_generate)


def _add_tasks(commands: Commands) -> None:
    tasks = commands.add_parser(
        "tasks", help="list the built-in tasks, or check a task YAML (--check my_task.yaml)"
    )
    tasks.add_argument("--check", metavar="TASK.yaml", help="validate a task and show its prompts")
    tasks.add_argument(
        "--data-root", help="benchmark folder (default: $EXPERTSTEER_DATA, else ../shared/...)"
    )
    tasks.set_defaults(handler=_tasks)


def _add_smoke_test(commands: Commands) -> None:
    smoke = commands.add_parser(
        "smoke-test", help="load the default expert and target, answer, and capture hidden states"
    )
    smoke.add_argument("--expert", default=DEFAULT_EXPERT)
    smoke.add_argument("--target", default=DEFAULT_TARGET)
    smoke.set_defaults(handler=_smoke_test)


def _add_run(commands: Commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a whole experiment from one YAML (capture, alignment, pairing, vectors, "
        "evaluation, report), reusing finished stages",
    )
    run.add_argument("--config", required=True, help="experiment YAML (configs/experiments/)")
    run.add_argument("--task", action="append", help="run only this task (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun every stage")
    run.add_argument(
        "--dry-run", action="store_true", help="print which stages would run or be reused"
    )
    run.set_defaults(handler=_run)


def _add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report", help="rebuild a run's report.md and figures from its metrics.json"
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(handler=_report)


def _add_export_gguf(commands: Commands) -> None:
    export = commands.add_parser(
        "export-gguf", help="write a run's steering vectors as a llama.cpp control vector"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="run directory or steering file")
    export.add_argument("out", metavar="OUT.gguf")
    export.add_argument(
        "--method", default="expertsteer", help="which method's vectors (default: expertsteer)"
    )
    export.add_argument(
        "--alpha", type=_alpha, help="strength folded into the vectors (default: chosen on dev)"
    )
    export.add_argument("--model-hint", help="llama.cpp architecture of the target (e.g. llama)")
    export.set_defaults(handler=_export_gguf)


def main(args: list[str] | None = None) -> None:
    """Run the `expertsteer` command line with `args` (default: `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_stage(args)
            return
        namespace = build_parser().parse_args(argv)
        configure_logging(namespace.verbose)
        if not namespace.verbose:
            hide_library_bars()
        try:
            namespace.handler(namespace)
        except ExpertSteerError as error:
            sys.exit(f"expertsteer: error: {error}")
    except ModuleNotFoundError as error:
        if error.name not in PIPELINE_MODULES:
            raise
        sys.exit(
            f"expertsteer: error: this command needs '{error.name}', one of the pipeline's "
            "dependencies: pip install 'expertsteer[pipeline]'"
        )
