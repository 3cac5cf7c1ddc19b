"""The LightningCLI of the stage modules and DataModules (`fit`, `validate`, `test`)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from expertsteer.errors import ExpertSteerError
from expertsteer.pipeline.console import configure_logging, route_lightning_logs

LIGHTNING_COMMANDS = ("fit", "validate", "test")
STAGE_MODULES = (
    "datamodules.paired_activations",
    "datamodules.task_examples",
    "lightning_modules.alignment",
    "lightning_modules.vectors",
    "lightning_modules.steer",
    "lightning_modules.evaluator",
    "lightning_modules.behaviour",
)


def lightning_cli(
    args: list[str] | dict[str, Any] | None = None,
    run: bool = True,
    exit_on_error: bool = True,
    build_model: bool = True,
    quiet: bool = False,
) -> Any:
    """LightningCLI over the stage modules and DataModules (`fit`, `validate`, `test`).

    Configs name classes by short name (`class_path: VectorsModule`): the stage packages are
    imported here so that jsonargparse finds them as subclasses. A stage's settings are
    dataclasses (`rfm: VectorsConfig`, ...): their fields are options with the docstring of
    each field as help, and a `Literal` field's choices are checked and listed. Stages build
    their own optimizers (`auto_configure_optimizers=False`), so a stray `--optimizer` cannot
    replace them; the resolved configuration is saved as `config.yaml` in the run's log directory.
    `quiet` (stages run by `expertsteer run`): no model summary and no validate metric table
    on the console (the metrics are in the CSV logs and `metrics.json`).
    """
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    route_lightning_logs()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # jsonargparse resolves short class names among the imported subclasses of
    # LightningModule / LightningDataModule, so the stages must be imported first.
    for module in STAGE_MODULES:
        importlib.import_module(module)

    class ExpertSteerCLI(LightningCLI):
        """Checks a stage's artifacts against its data before Lightning prepares the data
        (captures can take minutes; a wrong pairs file should not wait for them)."""

        def _preflight(self) -> None:
            check = getattr(self.model, "preflight", None)
            if check is not None and self.datamodule is not None:
                check(self.datamodule)

        def before_fit(self) -> None:
            self._preflight()

        def before_validate(self) -> None:
            self._preflight()

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
            from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

            class CountsProgressBar(RichProgressBar):
                """Counts and time left only: metric columns wrap on narrow consoles (the
                metrics are in the CSV logs)."""

                def get_metrics(self, trainer: Any, pl_module: Any) -> dict:
                    return {}

            given = [*(config.get("callbacks") or []), *callbacks]
            wants_bar = config.get("enable_progress_bar") is not False
            if quiet and wants_bar and not any(isinstance(c, ProgressBar) for c in given):
                callbacks = [*callbacks, CountsProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

        def instantiate_classes(self) -> None:
            if not build_model:
                # The model's values are parsed and type-checked above; building it would
                # read upstream artifacts that do not exist yet.
                from jsonargparse import Namespace

                self.config["model"] = Namespace(
                    class_path=PLACEHOLDER_MODEL, init_args=Namespace()
                )
            super().instantiate_classes()

    if quiet:
        hide_library_bars()
    if quiet and isinstance(args, list) and args and args[0] == "validate":
        args = [*args, "--verbose=false"]
    with warnings.catch_warnings():
        # Stages run in-process by `expertsteer run` pass `args` while sys.argv holds `run`.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ExpertSteerCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"enable_model_summary": False} if quiet else None,
            parser_kwargs={"exit_on_error": exit_on_error},
            args=args,
            run=run,
        )


PLACEHOLDER_MODEL = "lightning.pytorch.demos.boring_classes.BoringModel"


def hide_library_bars() -> None:
    """No per-file bars from datasets ("Generating train split") or transformers ("Loading
    weights") in a quiet stage: each step has its own bar."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
    except ModuleNotFoundError:  # a core install (no pipeline extra) reads no datasets
        return
    datasets.disable_progress_bars()


def parse_stage_config(config: dict[str, Any], build_model: bool = True) -> None:
    """Parse one stage config and build its trainer, data and (if `build_model`) model as the
    stage would (no weights load in `__init__`); any bad value raises `ExpertSteerError`."""
    try:
        with _quiet("lightning.pytorch", "lightning.fabric"):
            lightning_cli(config, run=False, exit_on_error=False, build_model=build_model)
    except ExpertSteerError:
        raise
    except Exception as error:  # jsonargparse, Lightning and __init__ checks raise many types
        raise ExpertSteerError(_first_line(error)) from error


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the INFO lines (seed, devices, tips) a trainer prints when it is built."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    """The innermost cause of an error, on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return text[:600] or type(error).__name__


def run_stage(args: list[str] | None = None, quiet: bool = False) -> None:
    """Run one LightningCLI command (`fit|validate|test --config ...`; None: `sys.argv`);
    `quiet`: a stage run by `expertsteer run` (see `lightning_cli`). An `ExpertSteerError`
    exits with its message."""
    configure_logging(verbose=True)
    try:
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        lightning_cli(args, quiet=quiet)
    except ExpertSteerError as error:
        sys.exit(f"expertsteer: error: {error}")
