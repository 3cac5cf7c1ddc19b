"""The paired-activation data module over the tiny models of `tests.tiny`.

A plain module (no pytest fixtures), so the DDP scripts of the slow tier, spawned as their own
processes, build their data module the same way the default tier does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from datamodules.paired_activations import PairedActivationDataModule

# Small splits of the arithmetic task: a few seconds of capture on the CPU.
SETTINGS = dict(task="arithmetic", steer_size=24, dev_size=12, test_size=4, batch_size=16)


def tiny_datamodule(
    models: Mapping[str, str | os.PathLike], cache: str | os.PathLike, **overrides
) -> PairedActivationDataModule:
    """A data module over `models["expert"]` and `models["target"]` (e.g. the `tiny_dirs`
    fixture) caching under `cache`: `SETTINGS`, then `overrides` (any keyword of
    `PairedActivationDataModule`, the models included)."""
    settings = {
        "expert": str(models["expert"]),
        "target": str(models["target"]),
        **SETTINGS,
        "cache": str(cache),
    }
    return PairedActivationDataModule(**{**settings, **overrides})


def prepared(module: PairedActivationDataModule) -> PairedActivationDataModule:
    """`module` with its activations captured (or found in the cache) and read for fitting."""
    module.prepare_data()
    module.setup("fit")
    return module
