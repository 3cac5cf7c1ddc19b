"""Deterministic, disjoint `steer` / `dev` / `test` splits of a task from a seed."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from expertsteer.data.tasks import Example, Task, TaskError

log = logging.getLogger(__name__)

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


def text_key(example: Example) -> tuple[str, str, tuple[str, ...]]:
    """What makes two examples the same item: passage, question and options (not the id)."""
    return example.context, example.question, example.choices


@dataclass
class Duplicates:
    """Rows of a task that repeat another row's text."""

    repeated: int
    """Later copies of a text with the same gold answer (one copy is kept)."""
    contradicting: list[str]
    """Texts that occur with two or more gold answers (every copy is dropped: no gold)."""
    contradicting_rows: int
    """Rows holding those texts."""

    @property
    def dropped(self) -> int:
        return self.repeated + self.contradicting_rows


def find_duplicates(examples: list[Example]) -> Duplicates:
    """Repeated and contradicting texts among `examples`."""
    counts: dict[tuple, int] = {}
    for example in examples:
        counts[text_key(example)] = counts.get(text_key(example), 0) + 1
    # In order of first appearance (a set's order would change from run to run).
    conflicting = _conflicting_keys(examples)
    conflicts = [key for key in counts if key in conflicting]
    repeated = sum(n - 1 for key, n in counts.items() if key not in conflicts)
    return Duplicates(
        repeated,
        [" / ".join(part for part in (key[0], key[1]) if part) for key in conflicts],
        sum(counts[key] for key in conflicts),
    )


def _unique(examples: list[Example], conflicts: set[tuple]) -> list[Example]:
    """`examples` in order with later copies of a text and contradicting texts left out."""
    seen: set[tuple] = set()
    kept = []
    for example in examples:
        key = text_key(example)
        if key in seen or key in conflicts:
            continue
        seen.add(key)
        kept.append(example)
    return kept


def _conflicting_keys(examples: list[Example]) -> set[tuple]:
    answers: dict[tuple, set] = {}
    for example in examples:
        answers.setdefault(text_key(example), set()).add(example.answer)
    return {key for key, seen in answers.items() if len(seen) > 1}


def make_splits(task: Task, sizes: SplitSizes, seed: int = 0) -> dict[str, list[Example]]:
    """Split `task` into steer / dev / test.

    `test` is drawn from the task's `test` pool when it has one (its official evaluation rows)
    and steer / dev from the other pools; a task with a single pool is shuffled and cut. Rows
    are deduplicated by text within the pool they come from, after each shuffle (so a task
    without duplicates splits exactly as before): a repeated text is kept once, a text with two
    gold answers not at all. Any steer / dev example whose prompt text also occurs in test is
    dropped, so no test question leaks into fitting or selection, and no item sits in both
    steer and dev. A split smaller than asked is logged (`split_shortfalls`); an empty one is an
    error naming its cause.
    """
    if task.type == "behaviour":
        return _behaviour_splits(task, sizes, seed)
    rng = random.Random(seed)
    if "test" in task.pools and len(task.pools) > 1:
        test_pool = list(task.pools["test"])
        fit_pool = [e for name, pool in task.pools.items() if name != "test" for e in pool]
        groups = [test_pool, fit_pool]
        fit_conflicts = _conflicting_keys(fit_pool)
    else:
        everything = task.all_examples()
        groups = [everything]
        fit_conflicts = _conflicting_keys(everything)
    _log_duplicates(task.name, groups)
    test_conflicts = _conflicting_keys(groups[0])
    if len(groups) == 1:
        rng.shuffle(everything)
        everything = _unique(everything, fit_conflicts)
        test_pool, fit_pool = everything[: sizes.test], everything[sizes.test :]
    rng.shuffle(test_pool)
    test_pool = _unique(test_pool, test_conflicts)
    test = test_pool[: sizes.test]
    seen = {text_key(e) for e in test}
    fit_pool = [e for e in fit_pool if text_key(e) not in seen]
    rng.shuffle(fit_pool)
    fit_pool = _unique(fit_pool, fit_conflicts)
    splits = {
        "steer": fit_pool[: sizes.steer],
        "dev": fit_pool[sizes.steer : sizes.steer + sizes.dev],
        "test": test,
    }
    if not splits["dev"] and splits["steer"]:
        raise TaskError(
            f"task '{task.name}': split 'dev' is empty: steer asks {sizes.steer} examples and "
            f"takes all {len(fit_pool)} left for steer+dev; lower splits.steer below "
            f"{len(fit_pool)} (and dev with it) or add data"
        )
    for name, examples in splits.items():
        if not examples:
            raise TaskError(
                f"task '{task.name}': split '{name}' is empty ({len(fit_pool)} "
                f"examples left for steer+dev, {len(test_pool)} for test); lower "
                "the split sizes or add data"
            )
    for line in split_shortfalls(task.name, splits, sizes):
        log.warning(line)
    return splits


def _log_duplicates(name: str, groups: list[list[Example]]) -> None:
    """Log what deduplication leaves out of the pools splits are drawn from."""
    found = [find_duplicates(group) for group in groups]
    repeated = sum(d.repeated for d in found)
    conflicting = sum(d.contradicting_rows for d in found)
    if repeated or conflicting:
        log.warning(
            "task '%s': %d repeated rows and %d rows of %d texts with contradicting gold "
            "answers left out of the splits",
            name,
            repeated,
            conflicting,
            sum(len(d.contradicting) for d in found),
        )


def split_shortfalls(name: str, splits: dict[str, list[Example]], sizes: SplitSizes) -> list[str]:
    """One line per split that got fewer examples than asked."""
    return [
        f"task '{name}': split '{split}' has {len(splits[split])} of the {getattr(sizes, split)} "
        "examples asked (the task has no more)"
        for split in SPLITS
        if len(splits[split]) < getattr(sizes, split)
    ]


def _behaviour_splits(task: Task, sizes: SplitSizes, seed: int) -> dict[str, list[Example]]:
    """A behaviour task's splits. Concept texts (labelled) fit the vectors: `steer` takes
    `sizes.steer` of them and `dev` the next `sizes.dev` (the RFM's validation and the transfer
    diagnostics). Prompts (unlabelled) are continued: `test` takes `sizes.test` of them and
    `dev` the next `sizes.dev` (the choice of alpha and layers). So `dev` holds both kinds;
    fitting reads its labelled texts, the behaviour evaluation its prompts."""
    rng = random.Random(seed)
    concept, prompts = list(task.pools["concept"]), list(task.pools["prompts"])
    _log_duplicates(task.name, [concept, prompts])
    rng.shuffle(concept)
    rng.shuffle(prompts)
    # Deduplicated after the shuffle, as every task's pools are (no text in two splits).
    concept = _unique(concept, _conflicting_keys(concept))
    prompts = _unique(prompts, set())
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
