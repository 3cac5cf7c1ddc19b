"""Command-line entry point: `expertsteer <command>` or `python -m expertsteer <command>`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from expertsteer.errors import ExpertSteerError

log = logging.getLogger("expertsteer")

DEFAULT_EXPERT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "smollm2-135m-instruct"
DEMO_QUESTION = "What is the capital of France?"
DEMO_PROMPTS = [
    DEMO_QUESTION,
    "Write a Python function that returns the sum of a list.",
    "Is the sentence 'I loved this film' positive or negative?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
]


def _models(_: argparse.Namespace) -> None:
    from expertsteer.cache import cache_dir
    from expertsteer.zoo import MANIFEST, PACKAGED

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
    from expertsteer.zoo import load_model

    for name in args.names:
        started = time.perf_counter()
        loaded = load_model(name)
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s at {loaded.path}")


def _generate(args: argparse.Namespace) -> None:
    from expertsteer.decoder import Decoder
    from expertsteer.zoo import load_model

    decoder = Decoder.from_loaded(load_model(args.model, dtype=args.dtype), args.chat_template)
    for prompt, answer in zip(
        args.prompt, decoder.generate(args.prompt, args.max_new_tokens), strict=True
    ):
        print(f"> {prompt}\n{answer.strip()}\n")


def _demo(args: argparse.Namespace) -> None:
    from expertsteer.capture import capture
    from expertsteer.decoder import Decoder
    from expertsteer.zoo import load_model

    for role, name in (("expert", args.expert), ("target", args.target)):
        started = time.perf_counter()
        decoder = Decoder.from_loaded(load_model(name))
        loaded_s = time.perf_counter() - started
        answer = decoder.generate([DEMO_QUESTION], max_new_tokens=24)[0].strip()
        started = time.perf_counter()
        states = capture(decoder, DEMO_PROMPTS, position="last")
        capture_s = time.perf_counter() - started
        norms = [f"{states[layer].norm(dim=-1).mean():.1f}" for layer in sorted(states)]
        print(
            f"\n[{role}] {name}: {decoder.num_layers} layers, d={decoder.hidden_size}, "
            f"ready in {loaded_s:.1f} s"
        )
        print(f"  > {DEMO_QUESTION}\n  {answer}")
        print(
            f"  captured last-token states of {len(DEMO_PROMPTS)} prompts at every layer in "
            f"{capture_s:.2f} s; mean residual norm per layer:\n  {' '.join(norms)}"
        )


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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the packaged models and their state")
    models.set_defaults(handler=_models)

    prepare = commands.add_parser(
        "prepare", help="convert packaged models (or .gguf files) into the cache once"
    )
    prepare.add_argument("names", nargs="+", metavar="MODEL")
    prepare.set_defaults(handler=_prepare)

    generate = commands.add_parser("generate", help="greedy answers from one model")
    generate.add_argument("--model", required=True, help="packaged name, directory, .gguf or id")
    generate.add_argument("--prompt", required=True, action="append", help="repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    generate.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the chat template (default: when the tokenizer has one)",
    )
    generate.set_defaults(handler=_generate)

    demo = commands.add_parser(
        "demo", help="load the default expert and target, answer, and capture hidden states"
    )
    demo.add_argument("--expert", default=DEFAULT_EXPERT)
    demo.add_argument("--target", default=DEFAULT_TARGET)
    demo.set_defaults(handler=_demo)
    return parser


LIGHTNING_COMMANDS = ("fit", "validate", "test")
STAGE_MODULES = (
    "datamodules.paired_activations",
    "lightning_modules.alignment",
    "lightning_modules.rfm",
)


def lightning_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """LightningCLI over the stage modules and DataModules (`fit`, `validate`, `test`).

    Configs name classes by short name (`class_path: RFMModule`): the stage packages are
    imported here so that jsonargparse finds them as subclasses. Stages build their own
    optimizers (`auto_configure_optimizers=False`), so a stray `--optimizer` cannot replace
    them; the resolved configuration is saved as `config.yaml` in the run's log directory.
    """
    from lightning.pytorch.cli import LightningCLI

    # jsonargparse resolves short class names among the imported subclasses of
    # LightningModule / LightningDataModule, so the stages must be imported first.
    for module in STAGE_MODULES:
        importlib.import_module(module)

    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Run the `expertsteer` command line with `args` (default: `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
        try:
            # args=None lets LightningCLI read sys.argv itself (it warns when given both).
            lightning_cli(args)
        except ExpertSteerError as error:
            sys.exit(f"expertsteer: error: {error}")
        return
    namespace = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if namespace.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        namespace.handler(namespace)
    except ExpertSteerError as error:
        sys.exit(f"expertsteer: error: {error}")
