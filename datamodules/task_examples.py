"""Task examples (questions with gold answers) for the steering evaluation stage.

`validate` runs two dataloaders, dev then test, over the same deterministic splits the
activation DataModule fits on (same task, sizes and seed give the same examples), so alpha and
layers are chosen on examples the vectors were not fitted on and reported on test. Batches are
plain lists of `Example`s; under DDP the distributed sampler shards them (and pads with
duplicates, which the evaluator drops by example id).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from expertsteer.data.catalogue import resolve_task
from expertsteer.data.splits import SplitSizes, behaviour_prompts, make_splits
from expertsteer.data.tasks import Example, Task, load_task

EVAL_SPLITS = ("dev", "test")


def as_list(batch: list[Example]) -> list[Example]:
    """Collate: keep the examples as they are."""
    return batch


class TaskExamplesDataModule(L.LightningDataModule):
    """Serves the dev and test examples of one task, in that order."""

    def __init__(
        self,
        task: str = "arithmetic",
        data_root: str | None = None,
        steer_size: int = 200,
        dev_size: int = 100,
        test_size: int = 200,
        seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            task: Built-in task name or path to a task YAML.
            data_root: Folder holding the benchmark files of built-in tasks (default:
                `$EXPERTSTEER_DATA`, else `../shared/data/benchmarks`; absent files: the hub).
            steer_size: Size of the steer split (must match the fitting stages' data so that
                dev and test are the same examples).
            dev_size: Examples in the dev split (choice of alpha and layers).
            test_size: Examples in the test split (reported once).
            seed: Seed of the split (same as the fitting stages').
            batch_size: Examples per validation batch.
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sizes = SplitSizes(steer_size, dev_size, test_size)
        self._task: Task | None = None
        self._splits: dict[str, list[Example]] | None = None

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = load_task(resolve_task(self.hparams.task), self.hparams.data_root)
        return self._task

    def splits(self) -> dict[str, list[Example]]:
        """steer / dev / test examples (validated non-empty by `make_splits`); a behaviour
        task's dev and test are its prompts only (its concept texts are fitting data)."""
        if self._splits is None:
            splits = make_splits(self.task, self.sizes, self.hparams.seed)
            if self.task.type == "behaviour":
                splits = {name: behaviour_prompts(examples) for name, examples in splits.items()}
            self._splits = splits
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self.splits()

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.splits()[split],
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=as_list,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """Dev first, then test: the evaluator chooses on dev before test is scored."""
        return [self._loader(split) for split in EVAL_SPLITS]
