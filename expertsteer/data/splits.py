"""Deterministic, disjoint `steer` / `dev` / `test` splits of a task from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from expertsteer.data.tasks import Example, Task, TaskError

SPLITS = ("steer", "dev", "test")


@dataclass
class SplitSizes:
    """How many examples each split takes (at most; a small task gives what it has)."""

    steer: int = 200
    """Examples for fitting auto-encoders, MI and the RFM."""
    dev: int = 100
    """Examples for choosing alpha and layer pairs."""
    test: int = 200
    """Examples for the reported numbers."""

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 1:
                raise ValueError(f"split size '{name}' must be >= 1, got {getattr(self, name)}")


def make_splits(task: Task, sizes: SplitSizes, seed: int = 0) -> dict[str, list[Example]]:
    """Split `task` into steer / dev / test.

    `test` is drawn from the task's `test` pool when it has one (its official evaluation rows)
    and steer / dev from the other pools; a task with a single pool is shuffled and cut. Any
    steer / dev example whose prompt text also occurs in test is dropped, so no test question
    leaks into fitting or selection.
    """
    if task.type == "behaviour":
        return _behaviour_splits(task, sizes, seed)
    rng = random.Random(seed)
    if "test" in task.pools and len(task.pools) > 1:
        test_pool = list(task.pools["test"])
        fit_pool = [e for name, pool in task.pools.items() if name != "test" for e in pool]
    else:
        everything = task.all_examples()
        rng.shuffle(everything)
        test_pool, fit_pool = everything[: sizes.test], everything[sizes.test :]
    rng.shuffle(test_pool)
    test = test_pool[: sizes.test]
    seen = {(e.context, e.question) for e in test}
    fit_pool = [e for e in fit_pool if (e.context, e.question) not in seen]
    rng.shuffle(fit_pool)
    splits = {
        "steer": fit_pool[: sizes.steer],
        "dev": fit_pool[sizes.steer : sizes.steer + sizes.dev],
        "test": test,
    }
    for name, examples in splits.items():
        if not examples:
            raise TaskError(
                f"task '{task.name}': split '{name}' is empty ({len(fit_pool)} "
                f"examples left for steer+dev, {len(test_pool)} for test); lower "
                "the split sizes or add data"
            )
    return splits


def _behaviour_splits(task: Task, sizes: SplitSizes, seed: int) -> dict[str, list[Example]]:
    """A behaviour task's splits. Concept texts (labelled) fit the vectors: `steer` takes
    `sizes.steer` of them and `dev` the next `sizes.dev` (the RFM's validation and the transfer
    diagnostics). Prompts (unlabelled) are continued: `test` takes `sizes.test` of them and
    `dev` the next `sizes.dev` (the choice of alpha and layers). So `dev` holds both kinds;
    fitting reads its labelled texts, the behaviour evaluation its prompts."""
    rng = random.Random(seed)
    concept, prompts = list(task.pools["concept"]), list(task.pools["prompts"])
    rng.shuffle(concept)
    rng.shuffle(prompts)
    splits = {
        "steer": concept[: sizes.steer],
        "dev": concept[sizes.steer : sizes.steer + sizes.dev]
        + prompts[sizes.test : sizes.test + sizes.dev],
        "test": prompts[: sizes.test],
    }
    needed = {"concept": sizes.steer + sizes.dev, "prompts": sizes.test + sizes.dev}
    for pool, count in needed.items():
        if len(task.pools[pool]) < count:
            raise TaskError(
                f"task '{task.name}': pool '{pool}' has {len(task.pools[pool])} rows, the split "
                f"sizes need {count}; lower the split sizes or add data"
            )
    return splits


def behaviour_prompts(examples: list[Example]) -> list[Example]:
    """The prompts (unlabelled examples) of a behaviour task's split."""
    return [example for example in examples if example.answer is None]
