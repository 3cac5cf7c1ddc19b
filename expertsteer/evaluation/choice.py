"""Settings of the evaluation's choice on dev and of its test report
(`lightning_modules.evaluator.SteeringEvaluator`): every method and every draw of the random
null is scored on dev at each alpha of one signed grid (and, with `layer_choice: dev`, at each
of its layers alone), the best is kept and test scores it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from expertsteer.method.conditioned import DEFAULT_C_MAX
from expertsteer.method.vectors import ALPHA_LIMIT, TOO_STRONG
from expertsteer.settings import check_choices, check_integer

DEFAULT_ALPHAS = (-0.9, -0.3, -0.1, 0.1, 0.3, 0.9)
"""Signed: a direction's sign is chosen on dev like its size (both signs of every vector)."""
LayerChoice = Literal["all", "dev"]


@dataclass(frozen=True)
class ChoiceConfig:
    """The dev grid of the evaluation and what its test report adds."""

    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    """Steering strengths tried on dev, as fractions of each layer's mean residual norm;
    signed (each direction's sign is chosen on dev too) and non-zero: a method is reported at
    its best non-zero strength, so "no gain" shows as no gain. The null's draws use the same
    grid, and `none+bias` gets as many candidate offsets as the largest search (alphas x layer
    sets), besides every constant class."""
    layer_choice: LayerChoice = "all"
    """`all` steers every layer of a method's artifact together; `dev` also tries each layer
    alone and keeps the best on dev (with `select: dev` pairing)."""
    c_max: list[float] = field(default_factory=lambda: list(DEFAULT_C_MAX))
    """Clip bounds of a conditioned method's coefficients c(x), tried on dev with every alpha
    and layer set (`expertsteer.method.conditioned`); fixed vectors ignore them."""
    num_samples: int = 3
    """Test prompts answered in free text with and without steering, for the report."""
    sample_tokens: int = 48
    """Generation budget of those samples."""
    n_boot: int = 2000
    """Bootstrap resamples of every interval."""

    def __post_init__(self) -> None:
        alphas = self.alphas
        real = isinstance(alphas, list | tuple) and all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in alphas
        )
        if not real or not alphas or any(not math.isfinite(a) or a == 0 for a in alphas):
            raise ValueError(
                "alphas must be a non-empty list of finite numbers, each non-zero (zero is "
                f"`none`), got {alphas!r}"
            )
        extreme = [a for a in alphas if abs(a) > ALPHA_LIMIT]
        if extreme:
            raise ValueError(f"alphas {extreme} exceed +-{ALPHA_LIMIT:g}: {TOO_STRONG}")
        object.__setattr__(self, "alphas", [float(a) for a in alphas])
        bounds = self.c_max
        if (
            not isinstance(bounds, list | tuple)
            or not bounds
            or any(
                isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < math.inf
                for c in bounds
            )
        ):
            raise ValueError(f"c_max must be a non-empty list of positive numbers, got {bounds!r}")
        object.__setattr__(self, "c_max", sorted({float(c) for c in bounds}))
        check_choices(self)
        check_integer("num_samples", self.num_samples, 0)
        check_integer("sample_tokens", self.sample_tokens, 1)
        check_integer("n_boot", self.n_boot, 1)
