"""Paired expert / target activations for the same examples, captured through nnsight.

Hidden states of both models for every steer / dev / test item go into a fingerprinted,
sharded cache (see `expertsteer.data.activations`), captured with the models on the rank's device
(the trainer's root device; the CPU without a trainer) in `model_dtype`. In one process
`prepare_data` captures the missing shards. Under DDP the ranks share the capture in `setup`:
shard n of the entry (splits in order) goes to rank n % world size, each rank writes its shards
atomically, and after a barrier rank 0 (local rank 0 of each node) writes `meta.json` with
every shard's sha256; in float32 the shards are the same bytes as one process's. `setup` then
reads the entry on every rank. Batches are
`{expert: [B, L_E, d_E], target: [B, L_T, d_T], label: [B], index: [B], id: list[str]}`.

Exactly-once semantics under DDP: the dataloaders use Lightning's distributed sampler, which
pads the last batch with duplicates — fine for gradient stages. Closed-form stages (MI, kernel
ridge regression) must not see duplicates: they call `split_tensors(split)`, which returns the
whole split, identical on every rank, straight from the cache.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from expertsteer.cache import cache_dir, file_lock
from expertsteer.data.activations import (
    STORAGE_DTYPES,
    CacheMismatchError,
    ModelKey,
    fingerprint,
    load_split,
    read_meta,
    shard_name,
    shard_ranges,
    write_meta,
    write_shard,
)
from expertsteer.data.catalogue import resolve_task
from expertsteer.data.prompts import Item, class_items, prompt_items, steering_items
from expertsteer.data.splits import SPLITS, SplitSizes, make_splits
from expertsteer.data.tasks import TaskError, load_task
from expertsteer.data.token_pairs import (
    CorpusConfig,
    corpus_texts,
    ensure_token_pairs,
    heldout_texts,
    load_token_pairs,
    read_token_meta,
    steer_texts,
)
from expertsteer.errors import ExpertSteerError
from expertsteer.models.batching import check_budget, naming_out_of_memory
from expertsteer.models.capture import POSITIONS, capture, capture_batches
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import (
    DEFAULT_EXPERT,
    DEFAULT_TARGET,
    check_dtype,
    load_model,
    model_dims,
    resolve_dtype,
    weights_identity,
)

log = logging.getLogger(__name__)

ITEM_KINDS = ("steering", "prompts", "classes")
TRAIN_SOURCES = ("items", "tokens")


class ActivationDataset(Dataset):
    """Map-style view over one split's cached tensors."""

    def __init__(self, tensors: dict) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["id"])

    def __getitem__(self, index: int) -> dict:
        return {
            "expert": self.tensors["expert"][index].float(),
            "target": self.tensors["target"][index].float(),
            "label": self.tensors["label"][index],
            "index": index,
            "id": self.tensors["id"][index],
        }


class LayerError(ExpertSteerError, ValueError):
    """A requested decoder block does not exist (reported in one line by the CLI)."""


def _check_layers(name: str, layers: list[int] | None, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(num_layers))
    bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
    if bad:
        raise LayerError(
            f"layer(s) {bad} do not exist in '{name}', which has {num_layers} "
            f"decoder blocks (valid: 0..{num_layers - 1}); fix expert_layers / target_layers"
        )
    if not layers:
        raise LayerError(f"empty layer list for '{name}'")
    return tuple(sorted({layer % num_layers for layer in layers}))


class PairedActivationDataModule(L.LightningDataModule):
    """Captures, caches and serves paired expert / target hidden states of one task."""

    def __init__(
        self,
        expert: str = DEFAULT_EXPERT,
        target: str = DEFAULT_TARGET,
        task: str = "arithmetic",
        data_root: str | None = None,
        item_kind: str = "steering",
        expert_layers: list[int] | None = None,
        target_layers: list[int] | None = None,
        position: str = "last",
        steer_size: int = 200,
        dev_size: int = 100,
        test_size: int = 200,
        seed: int = 0,
        storage_dtype: str = "float32",
        model_dtype: str = "auto",
        chat_template: bool | None = None,
        batch_size: int = 64,
        capture_batch_size: int = 8,
        max_batch_tokens: int | None = None,
        shard_size: int = 256,
        cache: str | None = None,
        num_workers: int = 0,
        capture_splits: list[str] | None = None,
        corpus: CorpusConfig | None = None,
        corpus_storage_dtype: str = "float16",
        train_on: str = "items",
    ) -> None:
        """
        Args:
            expert: Expert model: packaged name, local directory, .gguf file or hub id.
            target: Target model, same forms.
            task: Built-in task name or path to a task YAML.
            data_root: Folder holding the benchmark files of built-in tasks (default:
                `$EXPERTSTEER_DATA`, else `../shared/data/benchmarks`; absent files: the hub).
            item_kind: `steering` (prompt + correct / wrong answer, or concept texts),
                `prompts` (prompt only, unlabelled) or `classes` (prompt only, labelled with
                the item's gold class: conditioned steering).
            expert_layers: Expert blocks to capture (default: all).
            target_layers: Target blocks to capture (default: all).
            position: `last` prompt token or `mean` over prompt tokens.
            steer_size: Examples in the steer split (fitting).
            dev_size: Examples in the dev split (selection).
            test_size: Examples in the test split (reporting).
            seed: Seed of the split and of wrong-answer sampling.
            storage_dtype: Cache dtype: float32, float16 or bfloat16.
            model_dtype: Dtype the models run in during capture: float32, bfloat16, float16,
                or auto (bfloat16 on a CUDA device that supports it, else float32). A dtype
                other than float32 gives its own cache entry.
            chat_template: Apply chat templates (default: when the tokenizer has one).
            batch_size: Batch size of the dataloaders.
            capture_batch_size: Prompts per traced forward during capture.
            max_batch_tokens: Token budget of one traced forward during capture, of the items
                and of the token-pair corpus (texts times the longest, padding included): long
                texts make smaller batches, a text over the budget goes alone. None:
                `capture_batch_size` texts per forward. Lower it when the capture runs out of
                device memory.
            shard_size: Items per cache shard (the unit of resume).
            cache: Cache root (default: $EXPERTSTEER_CACHE or ~/.cache/expertsteer).
            num_workers: Dataloader workers.
            capture_splits: Splits to capture (default all three). The fitting stages read
                only steer and dev; leaving test out saves its capture, and test keeps the
                same examples (the split is drawn with every size as given).
            corpus: Also capture paired states at token level (`expertsteer.data.token_pairs`):
                generic texts of other tasks plus this task's steer items, for the
                `translate` alignment, translatability and held-out MI. None: no corpus.
            corpus_storage_dtype: Cache dtype of the token-level states.
            train_on: What the training dataloader serves: `items` (the steer split's
                sequence-level states) or `tokens` (the corpus's fit positions, for gradient
                refinement of a `translate` alignment).
        """
        super().__init__()
        # Checkpoints store hyperparameters; a plain dict keeps them loadable with
        # torch.load(weights_only=True), which refuses dataclass instances.
        self.corpus = CorpusConfig(**corpus) if isinstance(corpus, dict) else corpus
        corpus = None if self.corpus is None else asdict(self.corpus)
        self.save_hyperparameters()
        if item_kind not in ITEM_KINDS:
            raise ValueError(f"item_kind must be one of {ITEM_KINDS}, got '{item_kind}'")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got '{position}'")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got '{storage_dtype}'"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("capture_batch_size", capture_batch_size),
            ("shard_size", shard_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_dtype("model_dtype", model_dtype)
        check_budget("max_batch_tokens", max_batch_tokens)
        self.sizes = SplitSizes(steer_size, dev_size, test_size)
        captured = list(SPLITS) if capture_splits is None else list(capture_splits)
        unknown = sorted(set(captured) - set(SPLITS))
        if unknown or not {"steer", "dev"} <= set(captured):
            raise ValueError(
                f"capture_splits must include 'steer' and 'dev' and name only {SPLITS}, got "
                f"{capture_splits}"
            )
        self.captured = [split for split in SPLITS if split in captured]
        if train_on not in TRAIN_SOURCES:
            raise ValueError(f"train_on must be one of {TRAIN_SOURCES}, got '{train_on}'")
        if train_on == "tokens" and self.corpus is None:
            raise ValueError("train_on 'tokens' needs a token-level corpus: set `corpus`")
        if corpus_storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"corpus_storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got "
                f"'{corpus_storage_dtype}'"
            )
        self._models: dict[str, CausalLM] | None = None
        self._tokens: dict | None = None
        self._splits: dict[str, list[Item]] | None = None
        self._data: dict[str, dict] = {}
        self._dims: dict[str, tuple[int, int]] | None = None
        self._keys: tuple[ModelKey, ModelKey] | None = None

    # -- what will be captured ---------------------------------------------------------------

    def dims(self) -> dict[str, tuple[int, int]]:
        """(hidden size, layer count) of expert and target, without loading weights."""
        if self._dims is None:
            self._dims = {
                "expert": model_dims(self.hparams.expert),
                "target": model_dims(self.hparams.target),
            }
        return self._dims

    def split_items(self) -> dict[str, list[Item]]:
        """Items per split; validated (non-empty, both classes where labels are needed)."""
        if self._splits is None:
            hp = self.hparams
            task = load_task(resolve_task(hp.task), hp.data_root)
            examples = make_splits(task, self.sizes, hp.seed)
            if hp.item_kind == "steering":
                splits = {
                    name: steering_items(task, examples[name], hp.seed) for name in self.captured
                }
                for name, items in splits.items():
                    classes = {item.label for item in items}
                    if classes != {0, 1}:
                        raise TaskError(
                            f"task '{task.name}', split '{name}': steering needs "
                            f"both labels 0 and 1, found {sorted(classes)}"
                        )
            elif hp.item_kind == "classes":
                splits = {name: class_items(task, examples[name]) for name in self.captured}
                for name, items in splits.items():
                    if len({item.label for item in items}) < 2:
                        raise TaskError(
                            f"task '{task.name}', split '{name}': class items need at least "
                            "two gold classes"
                        )
            else:
                splits = {name: prompt_items(task, examples[name]) for name in self.captured}
            self._splits = splits
        return self._splits

    def keys(self) -> tuple[ModelKey, ModelKey]:
        """What identifies each side's activations (weights hashed once per instance)."""
        if self._keys is not None:
            return self._keys
        dims = self.dims()
        hp = self.hparams
        self._keys = tuple(
            ModelKey(
                model_id=name,
                weights_sha256=weights_identity(name),
                layers=_check_layers(name, layers, dims[side][1]),
                chat_template=hp.chat_template,
            )
            for side, name, layers in (
                ("expert", hp.expert, hp.expert_layers),
                ("target", hp.target, hp.target_layers),
            )
        )
        return self._keys

    def cache_path(self) -> Path:
        """Directory of this configuration's cache entry."""
        expert, target = self.keys()
        hp = self.hparams
        digest = fingerprint(
            expert, target, hp.position, hp.storage_dtype, hp.shard_size, self.split_items()
        )
        model_dtype = self.model_dtype()
        if model_dtype != "float32":
            # Captured in another precision: an entry of its own; float32 keeps its fingerprints.
            digest = hashlib.sha256(f"{digest}\0model_dtype\0{model_dtype}".encode())
            digest = digest.hexdigest()[:32]
        root = Path(hp.cache).expanduser() if hp.cache else cache_dir()
        return root / "activations" / digest

    # -- where and how the models run ---------------------------------------------------------

    def root_device(self) -> torch.device:
        """The rank's device: the trainer's root device (the CPU without a trainer)."""
        if self.trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def model_dtype(self) -> str:
        """The dtype the models capture in on this rank's device (`model_dtype` resolved)."""
        return resolve_dtype(self.hparams.model_dtype, self.root_device())

    def _world(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) without a trainer."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """In one process, capture whatever activation shards are missing (resumable; a
        complete entry is reused); under DDP `setup` shares that out. Then the token pairs."""
        try:
            if self._world()[1] == 1:
                directory = self.cache_path()
                if read_meta(directory) is None:
                    directory.mkdir(parents=True, exist_ok=True)
                    with file_lock(directory.parent / f"{directory.name}.lock"):
                        if read_meta(directory) is None:
                            started = time.perf_counter()
                            self._capture(directory, self._missing_shards(directory))
                            self._write_meta(directory, time.perf_counter() - started)
            hp = self.hparams
            for entry in self.corpus_entries():
                with naming_out_of_memory(
                    f"token-pair capture on {self.root_device()}", self._memory_advice()
                ):
                    ensure_token_pairs(
                        entry["root"],
                        entry["keys"],
                        entry["texts"],
                        self.corpus,
                        hp.corpus_storage_dtype,
                        self._decoders,
                        hp.capture_batch_size,
                        hp.max_batch_tokens,
                        self.model_dtype(),
                    )
        finally:
            self._models = None

    def _capture_across_ranks(self) -> None:
        """Every rank captures its share of the missing shards (shard n to rank n % world);
        after a barrier local rank 0 writes `meta.json`. Every rank joins every collective."""
        strategy = self.trainer.strategy
        directory = self.cache_path()
        complete = read_meta(directory) is not None
        # All ranks must take the same branch, or one would wait at a barrier alone.
        if strategy.reduce_boolean_decision(complete, all=True):
            return
        rank, world = self._world()
        started = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        shards = self._shards()
        self._capture(directory, self._missing_shards(directory, shards[rank::world]))
        strategy.barrier("activation shards captured")
        unseen = self._missing_shards(directory)
        if unseen:
            # Another node's shards on a cache this node does not share: capture them here.
            log.warning(
                "rank %d does not see %d shard(s) other ranks wrote to %s (a cache folder not "
                "shared between nodes); capturing them again here",
                rank,
                len(unseen),
                directory,
            )
            self._capture(directory, unseen)
        strategy.barrier("activation shards complete")
        if self.trainer.local_rank == 0 and read_meta(directory) is None:
            self._write_meta(directory, time.perf_counter() - started)
        strategy.barrier("activation cache complete")

    def _decoders(self) -> dict[str, CausalLM]:
        """Both models on this rank's device, loaded once per capture."""
        if self._models is None:
            hp = self.hparams
            device, dtype = self.root_device(), self.model_dtype()
            self._models = {
                side: CausalLM.from_loaded(load_model(name, dtype, device), hp.chat_template)
                for side, name in (("expert", hp.expert), ("target", hp.target))
            }
        return self._models

    # -- token-level pairs -------------------------------------------------------------------

    def corpus_entries(self) -> list[dict]:
        """The token-pair cache entries of this configuration: the generic corpus (shared by
        every task that leaves out the same tasks) and this task's steer items."""
        if self.corpus is None:
            return []
        hp = self.hparams
        expert_key, target_key = self.keys()
        root = Path(hp.cache).expanduser() if hp.cache else cache_dir()
        keys = {"expert": expert_key, "target": target_key}
        task_name = resolve_task(hp.task).name
        entries = []
        if self.corpus.size:
            texts = corpus_texts(self.corpus, task_name, hp.data_root, hp.seed)
            entries.append({"root": root, "keys": keys, "texts": texts})
        if self.corpus.steer_items:
            items = self.split_items()["steer"]
            entries.append({"root": root, "keys": keys, "texts": steer_texts(items)})
        return entries

    def token_pairs(self) -> dict:
        """Paired token states of the corpus (after `setup`): `expert [n, L_E, d_E]`,
        `target [n, L_T, d_T]` (storage dtype), `source [n]` (0 corpus, 1 steer item),
        `heldout [n]` (bool, whole texts held out), `positions`, `capture_seconds`."""
        if self.corpus is None:
            raise RuntimeError(
                "no token-level corpus is configured: set the data module's `corpus` option"
            )
        if self._tokens is None:
            raise RuntimeError("token pairs are not loaded: call setup()")
        return self._tokens

    def _load_tokens(self) -> None:
        parts, heldout, seconds = [], [], 0.0
        for entry in self.corpus_entries():
            directory = ensure_token_pairs(
                entry["root"],
                entry["keys"],
                entry["texts"],
                self.corpus,
                self.hparams.corpus_storage_dtype,
                self._missing_capture,
                model_dtype=self.model_dtype(),
            )
            meta = read_token_meta(directory)
            data = load_token_pairs(directory, meta)
            held = heldout_texts(meta["texts"], self.corpus.heldout, self.hparams.seed)
            heldout.append(held[data["text"]])
            parts.append(data)
            seconds += meta["capture_seconds"]
        self._tokens = {
            "expert": torch.cat([p["expert"] for p in parts]),
            "target": torch.cat([p["target"] for p in parts]),
            "source": torch.cat([p["source"] for p in parts]),
            "heldout": torch.cat(heldout),
            "positions": sum(p["text"].shape[0] for p in parts),
            "capture_seconds": round(seconds, 2),
        }

    @staticmethod
    def _missing_capture() -> dict[str, CausalLM]:
        raise CacheMismatchError(
            "the token-pair cache is incomplete; run prepare_data() (Lightning does it before "
            "setup)"
        )

    def _shards(self) -> list[tuple[str, int, int, int]]:
        """Every shard of the entry as (split, index, first item, end), splits in order."""
        splits = self.split_items()
        return [
            (split, k, start, stop)
            for split in self.captured
            for k, (start, stop) in enumerate(
                shard_ranges(len(splits[split]), self.hparams.shard_size)
            )
        ]

    def _missing_shards(
        self, directory: Path, shards: list[tuple[str, int, int, int]] | None = None
    ) -> list[tuple[str, int, int, int]]:
        """The shards (default: all) with no file in `directory` yet."""
        shards = self._shards() if shards is None else shards
        return [s for s in shards if not (directory / shard_name(s[0], s[1])).is_file()]

    def _capture(self, directory: Path, todo: list[tuple[str, int, int, int]]) -> None:
        """Capture and write the shards `todo` (each file atomically)."""
        hp = self.hparams
        log.info("activation cache %s: %d shard(s) to capture", directory, len(todo))
        if not todo:
            return
        splits = self.split_items()
        keys = dict(zip(("expert", "target"), self.keys(), strict=True))
        models = self._decoders()
        dtype = STORAGE_DTYPES[hp.storage_dtype]
        batches = sum(
            len(self._batches(models[side], splits[split][start:stop]))
            for split, _, start, stop in todo
            for side in keys
        )
        advice = self._memory_advice()
        bar = tqdm(total=batches, desc="capture (both models)", unit="batch")
        for split, k, start, stop in todo:
            items = splits[split][start:stop]
            with naming_out_of_memory(f"activation capture on {self.root_device()}", advice):
                states = {
                    side: self._states(models[side], key, items, dtype, lambda: bar.update(1))
                    for side, key in keys.items()
                }
            labels = torch.tensor([item.label for item in items], dtype=torch.long)
            write_shard(
                directory / shard_name(split, k),
                states["expert"],
                states["target"],
                labels,
                [item.id for item in items],
            )
        bar.close()

    def _memory_advice(self) -> str:
        hp = self.hparams
        return (
            f"lower the data module's max_batch_tokens (now {hp.max_batch_tokens}) or "
            f"capture_batch_size (now {hp.capture_batch_size})"
        )

    def _write_meta(self, directory: Path, seconds: float) -> None:
        """`meta.json` of a complete entry (last: it marks the entry complete)."""
        hp = self.hparams
        expert_key, target_key = self.keys()
        meta = {
            "expert": {**vars(expert_key), "hidden_size": self.dims()["expert"][0]},
            "target": {**vars(target_key), "hidden_size": self.dims()["target"][0]},
            "splits": {name: len(items) for name, items in self.split_items().items()},
            "task": hp.task,
            "item_kind": hp.item_kind,
            "position": hp.position,
            "storage_dtype": hp.storage_dtype,
            "shard_size": hp.shard_size,
            "capture_seconds": round(seconds, 2),
        }
        write_meta(directory, meta)

    def _batches(self, decoder: CausalLM, items: list[Item]) -> list[list[int]]:
        completions = [item.completion for item in items]
        return capture_batches(
            decoder,
            [item.prompt for item in items],
            completions if any(completions) else None,
            self.hparams.capture_batch_size,
            self.hparams.max_batch_tokens,
        )

    def _states(
        self,
        decoder: CausalLM,
        key: ModelKey,
        items: list[Item],
        dtype: torch.dtype,
        on_batch: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        completions = [item.completion for item in items]
        states = capture(
            decoder,
            [item.prompt for item in items],
            list(key.layers),
            self.hparams.position,
            completions=completions if any(completions) else None,
            batch_size=self.hparams.capture_batch_size,
            dtype=dtype,
            on_batch=on_batch,
            max_tokens=self.hparams.max_batch_tokens,
        )
        return torch.stack([states[layer] for layer in key.layers], dim=1)

    def setup(self, stage: str | None = None) -> None:
        if self._world()[1] > 1:
            try:
                self._capture_across_ranks()
            finally:
                self._models = None
        directory = self.cache_path()
        meta = read_meta(directory)
        if meta is None:
            raise CacheMismatchError(
                f"no complete activation cache at {directory}; run "
                "prepare_data() (Lightning does it before setup)"
            )
        expert_key, target_key = self.keys()
        for side, key in (("expert", expert_key), ("target", target_key)):
            if (
                tuple(meta[side]["layers"]) != key.layers
                or meta[side]["weights_sha256"] != key.weights_sha256
            ):
                raise CacheMismatchError(
                    f"cache {directory} holds {side} activations of another model or layer set"
                )
        self._data = {split: load_split(directory, split, meta) for split in self.captured}
        if self.corpus is not None and self._tokens is None:
            self._load_tokens()

    def split_tensors(self, split: str) -> dict:
        """The whole split (every example once, same on every rank): tensors and ids."""
        if split not in self._data:
            why = "it is not in capture_splits" if split not in self.captured else "call setup()"
            raise RuntimeError(f"split '{split}' is not loaded: {why}")
        return self._data[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            ActivationDataset(self.split_tensors(split)),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self.hparams.train_on == "tokens":
            tokens = self.token_pairs()
            fit = ~tokens["heldout"]
            rows = {
                "expert": tokens["expert"][fit],
                "target": tokens["target"][fit],
                "label": torch.full((int(fit.sum()),), -1, dtype=torch.long),
                "id": [f"token:{k}" for k in range(int(fit.sum()))],
            }
            return DataLoader(
                ActivationDataset(rows),
                batch_size=self.hparams.batch_size,
                shuffle=True,
                num_workers=self.hparams.num_workers,
            )
        return self._loader("steer", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
