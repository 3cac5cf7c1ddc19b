"""Steering-vector fitting as a Lightning stage (`VectorsModule`): a Recursive Feature Machine
advanced one iteration per epoch, or a baseline extractor (`mean_diff`, `pca_diff`,
`logistic`, `random`) in one epoch.

Epoch t (t = 0..T): at its start every pair's RFM updates its metric by the AGOP of iteration
t-1 (t > 0) and solves the kernel ridge regression; validation then scores every bandwidth by
AUROC on the whole dev split (the fitter's own, the one it selects by), and the fit stops itself
after iteration T. At the end of fitting the best (bandwidth, iteration) of each pair gives the
top AGOP eigenvector, mapped into the target's space and written to `steering.safetensors`.

Data comes from `PairedActivationDataModule.split_tensors`, the whole split on every rank, so
under DDP every rank solves the identical problem (no sampler duplicates, no gather needed) and
rank 0 alone writes the artifact. The closed-form work needs no optimizer step; the module's
parameters are the kernel hyperparameters (log bandwidth factors of the grid and log ridge),
which `tune_steps > 0` adjusts by gradient of the validation loss — and which keep DDP, which
refuses a module with nothing to train, content.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import nn

from expertsteer.artifacts import ALIGNMENT_FILE, STEERING_FILE
from expertsteer.cache import sha256_file
from expertsteer.data.activations import model_identity
from expertsteer.data.catalogue import resolve_task
from expertsteer.evaluation.transfer import (
    direction_diagnostics,
    mapped_random_directions,
    native_direction,
    transfer_verdict,
)
from expertsteer.method.align import AffineAutoencoders, load_alignment
from expertsteer.method.conditioned import (
    READER_BLOCKS,
    READER_FILE,
    READER_FOLDS,
    READERS,
    Reading,
    best_block,
    check_classes,
    class_labels,
    fit_reading,
    reader_block_accuracies,
    save_reading,
)
from expertsteer.method.extractors import EXTRACTORS
from expertsteer.method.fitting import VectorFit, fit_record
from expertsteer.method.fitting import norm_scale as measured_norm_scale
from expertsteer.method.pair import read_pairs_file
from expertsteer.method.rfm import (
    RFMFitter,
    VectorsConfig,
    auroc,
    top_directions,
    tune_hyperparameters,
)
from expertsteer.method.vectors import SteeringVectors, save_steering
from expertsteer.settings import check_choice, settings_of

log = logging.getLogger(__name__)

Extractor = Literal[tuple(EXTRACTORS)]
"""The extractors of `expertsteer.method.extractors.EXTRACTORS`."""
Source = Literal["expert", "target"]
Reader = Literal[READERS]
ReaderBlock = Literal[READER_BLOCKS]
CONDITIONED_EXTRACTORS = ("mean_diff", "logistic")
"""Extractors of conditioned push directions: one epoch, any class labels (`pca_diff` pairs
rows as prompt + right / wrong answer, and the RFM runs per epoch)."""


class VectorsModule(L.LightningModule):
    """Fits steering vectors for target layers from expert (or target) hidden states, by RFM
    or by a baseline extractor; with `reader`, the push directions and reader of conditioned
    steering."""

    def __init__(
        self,
        method: Extractor = "rfm",
        source: Source = "expert",
        alignment_file: str | None = None,
        pairs_file: str | None = None,
        pairs: list[list[int]] | None = None,
        rfm: VectorsConfig = VectorsConfig(),  # noqa: B008 (frozen: one shared default)
        seed: int = 0,
        output_dir: str | None = None,
        reader: Reader | None = None,
        reader_block: ReaderBlock = "paired",
    ) -> None:
        """
        Args:
            method: Extractor: `rfm` or a baseline (`mean_diff`, `pca_diff`, `logistic`,
                `random`).
            source: Whose states the extractor reads: `expert` (ExpertSteer) or `target`
                (target-self baselines).
            alignment_file: `alignment.safetensors` of the run (required for the expert).
            pairs_file: `pairs.json` of the run: the [expert layer, target layer] pairs.
            pairs: Explicit [[expert layer, target layer], ...] instead of `pairs_file`.
            rfm: Settings of the fit (`VectorsConfig`): the RFM's (iterations T: the fit runs
                T + 1 epochs, M_0 = I then T AGOPs), the expert's space and the precision.
            seed: Seed of the `random` baseline.
            output_dir: Run directory for `steering.safetensors` (default: the trainer's
                `default_root_dir`).
            reader: Conditioned steering (`expertsteer.method.conditioned`; the data are
                class items): whose states read each input, `expert` (at the first pair's
                expert block) or `target` (at its target block); the vectors are then the
                push directions (class 1, or one per class) and `reader.safetensors` is
                written beside them. None: a fixed vector.
            reader_block: Where the reader reads: `paired` (the block named above) or `best`
                (the block of the reader's model whose reading classifies the steer split
                best in stratified cross-validation; dev and test are not used).
        """
        super().__init__()
        self.config = settings_of(VectorsConfig, rfm)
        # A plain dict in the hyperparameters keeps checkpoints loadable with weights_only.
        rfm = dataclasses.asdict(self.config)
        self.save_hyperparameters()
        check_choice("method", method, get_args(Extractor))
        check_choice("source", source, get_args(Source))
        if (pairs_file is None) == (pairs is None):
            raise ValueError("give exactly one of `pairs_file` (pairs.json) or `pairs`")
        if pairs is not None and (not pairs or any(len(pair) != 2 for pair in pairs)):
            raise ValueError(f"pairs must be a non-empty list of [expert, target], got {pairs}")
        check_choice("reader_block", reader_block, READER_BLOCKS)
        if reader is not None:
            check_choice("reader", reader, READERS)
            if method not in CONDITIONED_EXTRACTORS:
                raise ValueError(
                    f"method '{method}' cannot fit conditioned push directions; choose one of "
                    f"{CONDITIONED_EXTRACTORS}"
                )
        if source == "expert" and alignment_file is None:
            raise ValueError(
                f"source 'expert' needs `alignment_file` ({ALIGNMENT_FILE} of the alignment "
                "stage) to bring expert directions into the target's space"
            )
        self.automatic_optimization = False
        scales = torch.tensor(self.config.bandwidth_scales, dtype=torch.float64)
        self.log_bandwidth_scales = nn.Parameter(scales.log())
        self.log_ridge = nn.Parameter(
            torch.tensor(math.log(self.config.ridge), dtype=torch.float64)
        )
        self.aligner: AffineAutoencoders | None = None
        self.alignment_meta: dict | None = None
        self.layer_pairs: list[tuple[int, int]] = []
        self.fitters: list[RFMFitter] = []
        self.directions: list[torch.Tensor] = []
        self.block_accuracies: dict[int, float] | None = None
        """Cross-validated reading accuracy per block (`reader_block: best`, once computed)."""
        self.classes = 2

    # -- data --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.preflight(self.trainer.datamodule)

    def preflight(self, datamodule: L.LightningDataModule) -> None:
        """Read the pairs and the alignment (small files), checked against the DataModule.

        The CLI calls this before fitting starts, so a missing or mismatched artifact or a
        layer the models do not have fails before any activation is captured."""
        expert_key, target_key = datamodule.keys()
        hp = self.hparams
        expect = model_identity(expert_key, target_key)
        listed = read_pairs_file(hp.pairs_file)[0] if hp.pairs_file is not None else hp.pairs
        pairs = [(int(i), int(j)) for i, j in listed]
        for i, j in pairs:
            if j not in target_key.layers:
                raise ValueError(f"target layer {j} is not among the captured {target_key.layers}")
            if hp.source == "expert" and i not in expert_key.layers:
                raise ValueError(f"expert layer {i} is not among the captured {expert_key.layers}")
        self.layer_pairs = pairs
        if hp.source == "expert":
            self.aligner, self.alignment_meta = load_alignment(hp.alignment_file, expect)
            missing = [i for i, _ in pairs if i not in self.alignment_meta["expert_layers"]]
            if missing:
                raise ValueError(
                    f"{hp.alignment_file} holds auto-encoders for expert layers "
                    f"{self.alignment_meta['expert_layers']}, not {missing}; rerun the alignment "
                    "with these pairs (or keep_all_layers: true)"
                )

    @property
    def vector_fit(self) -> VectorFit:
        """The fitting steps this stage shares with the Python API
        (`expertsteer.method.fitting.VectorFit`), over the loaded alignment."""
        hp = self.hparams
        expert_layers = (self.alignment_meta or {}).get("expert_layers")
        return VectorFit(hp.method, hp.source, self.config, self.aligner, expert_layers, hp.seed)

    def _encoder_index(self, expert_layer: int) -> int:
        """Index of `expert_layer`'s auto-encoder in the alignment artifact."""
        return list(self.alignment_meta["expert_layers"]).index(expert_layer)

    def _features(self, split: str, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], y [n]) of one pair on one split, in the space the extractor runs in."""
        expert_key, target_key = self.trainer.datamodule.keys()
        i, j = pair
        if self.hparams.source == "target":
            x, y = self._states(split, "target", target_key.layers.index(j))
        else:
            x, y = self._states(split, "expert", expert_key.layers.index(i))
        return self.vector_fit.features(pair, x), y.long()

    # -- Lightning hooks -----------------------------------------------------------------------

    def on_fit_start(self) -> None:
        needed = self.config.iterations + 1 if self.hparams.method == "rfm" else 1
        max_epochs = self.trainer.max_epochs
        # fast_dev_run checks the plumbing with one epoch (iteration 0, the identity metric).
        if not self.trainer.fast_dev_run and max_epochs is not None and 0 <= max_epochs < needed:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} is too small: the {self.hparams.method} fit "
                f"needs {needed} epoch(s) (iterations + 1); the module stops itself when done"
            )

    def on_train_epoch_start(self) -> None:
        with torch.no_grad():
            if self.current_epoch == 0:
                self._start()
            elif self.hparams.method == "rfm":
                for fitter in self.fitters:
                    fitter.update()
            for fitter in self.fitters:
                fitter.solve()

    def _start(self) -> None:
        hp = self.hparams
        data = [(self._features("steer", p), self._features("dev", p)) for p in self.layer_pairs]
        if hp.reader is not None:
            self.directions = [
                self._push_rows(x, y, x_val, y_val) for (x, y), (x_val, y_val) in data
            ]
            return
        if hp.method != "rfm":
            fit = self.vector_fit
            self.directions = [
                fit.directions(x, y, x_val, y_val)[0][0] for (x, y), (x_val, y_val) in data
            ]
            return
        if self.config.tune_steps:
            self._tune(data)
        scales = tuple(float(s) for s in self.log_bandwidth_scales.detach().exp())
        config = dataclasses.replace(
            self.config, ridge=float(self.log_ridge.detach().exp()), bandwidth_scales=scales
        )
        self.fitters = [RFMFitter(x, y, xv, yv, config) for (x, y), (xv, yv) in data]

    def _push_rows(
        self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
    ) -> torch.Tensor:
        """Push directions [K, d] of class items: class 1 vs 0, or one-vs-rest per class."""
        self.classes = int(y.max()) + 1
        check_classes(y, self.classes, "the steer split")
        fit = self.vector_fit
        return torch.cat(
            [
                fit.directions(x, label, x_val, (y_val == (k if self.classes > 2 else 1)).long())[0]
                for k, label in enumerate(class_labels(y, self.classes))
            ]
        )

    def _tune(self, data: list) -> None:
        """Tune the log bandwidth factors and log ridge (`tune_hyperparameters`: Adam on the
        summed validation MSE of every grid point and pair at M = I; identical on every rank:
        same data, same steps)."""
        log_scales, log_ridge = tune_hyperparameters(
            [(x, y, x_val, y_val) for (x, y), (x_val, y_val) in data],
            self.log_bandwidth_scales,
            self.log_ridge,
            steps=self.config.tune_steps,
            lr=self.config.tune_lr,
            center=self.config.center,
        )
        with torch.no_grad():
            self.log_bandwidth_scales.copy_(log_scales)
            self.log_ridge.copy_(log_ridge)
        log.info(
            "tuned bandwidth factors %s, ridge %.3g",
            [round(float(s), 4) for s in self.log_bandwidth_scales.exp()],
            float(self.log_ridge.exp()),
        )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: the closed-form iteration ran in `on_train_epoch_start` on the
        whole split (a kernel needs every example exactly once, not the sampler's shard)."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: scoring needs the whole dev split (`on_validation_epoch_end`)."""

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not (self.fitters or self.directions):
            return
        with torch.no_grad():
            if self.hparams.method == "rfm":
                self._log_rfm_iteration()
            elif self.hparams.reader is not None:
                reading = self.reading()
                states, labels = self._reader_states("dev")
                accuracy = (reading.predict(reading.scores(states)) == labels).double().mean()
                self.log("val/reader_accuracy", float(accuracy), sync_dist=True)
            else:
                for index, (pair, direction) in enumerate(
                    zip(self.layer_pairs, self.directions, strict=True)
                ):
                    x_val, y_val = self._features("dev", pair)
                    score = auroc(x_val @ direction, y_val)
                    self.log(f"val/direction_auroc/pair{index}", score, sync_dist=True)
        done = self.hparams.method != "rfm" or self.current_epoch >= self.config.iterations
        if done:
            self.trainer.should_stop = True

    def _log_rfm_iteration(self) -> None:
        best = []
        for index, fitter in enumerate(self.fitters):
            scores = fitter.evaluate()  # the AUROC the fit selects by, one per bandwidth
            for factor, score in zip(self.config.bandwidth_scales, scores, strict=True):
                self.log(f"val/auroc/pair{index}/bw{factor:g}", score, sync_dist=True)
            top = max(range(len(scores)), key=lambda k: scores[k])
            (direction,), _ = top_directions(fitter.agop_of(top), fitter.x, fitter.y, 1)
            self.log(
                f"val/direction_auroc/pair{index}",
                auroc(fitter.x_val @ direction, fitter.y_val),
                sync_dist=True,
            )
            best.append(max(scores))
        self.log("val/auroc", sum(best) / len(best), prog_bar=True, sync_dist=True)
        self.log("rfm/iteration", float(self.current_epoch), sync_dist=True)

    def configure_optimizers(self) -> None:
        """No optimizer: the fit is closed form (tuning uses its own Adam, see `_tune`)."""
        return None

    def on_fit_end(self) -> None:
        if not (self.fitters or self.directions):
            return
        steering = self.steering_vectors()
        if self.trainer.is_global_zero:
            path = Path(self.hparams.output_dir or self.trainer.default_root_dir) / STEERING_FILE
            save_steering(path, steering)
            log.info("steering vectors for target layers %s -> %s", steering.layers, path)
            if self.hparams.reader is not None:
                reader = save_reading(path.with_name(READER_FILE), self.reading())
                log.info("%s reading of each input -> %s", self.hparams.reader, reader)
        self.trainer.strategy.barrier()

    # -- results -------------------------------------------------------------------------------

    def steering_vectors(self) -> SteeringVectors:
        """The fitted vectors per target layer with their metadata."""
        datamodule = self.trainer.datamodule
        expert_key, target_key = datamodule.keys()
        dev = datamodule.split_tensors("dev")
        vectors, directions, norm_scale, fits = {}, {}, {}, []
        fit = self.vector_fit
        for index, pair in enumerate(self.layer_pairs):
            if self.hparams.method == "rfm":
                result = self.fitters[index].result()
                rows = result.directions
            else:
                # Conditioned: already [K, d], one push direction per class label.
                rows = self.directions[index]
                result, rows = None, rows if rows.ndim == 2 else rows[None, :]
            fits.append(fit_record(pair, result))
            x, y = self._features("steer", pair)
            if self.hparams.reader is not None:
                # One orientation per push direction: its own class against the others.
                labels = class_labels(y, self.classes)
                mapped = torch.cat(
                    [
                        fit.target_rows(pair, rows[k : k + 1], x, label)
                        for k, label in enumerate(labels)
                    ]
                )
            else:
                mapped = fit.target_rows(pair, rows, x, y)
            j = pair[1]
            if j in vectors:
                raise ValueError(f"target layer {j} appears in more than one pair")
            vectors[j], directions[j] = mapped[0].float(), mapped.float()
            norm_scale[j] = measured_norm_scale(dev["target"][:, target_key.layers.index(j)])
        metadata = {
            "method": self.hparams.method,
            "source": self.hparams.source,
            "space": fit.space,
            **model_identity(expert_key, target_key),
            "pairs": [list(pair) for pair in self.layer_pairs],
            "positions": "all",
            "norm_scale": "mean L2 norm of the target block output on the dev split",
            "data_fingerprint": datamodule.cache_path().name,
            # The precision the states were captured in (results depend on it; see
            # `expertsteer.environment`).
            "capture_dtype": datamodule.model_dtype(),
            # The task's name (a task YAML's `name`, not its path), as the evaluation sees it.
            "task": resolve_task(datamodule.hparams.task).name,
            "alignment_objective": (self.alignment_meta or {}).get("objective"),
            "alignment_sha256": (
                sha256_file(self.hparams.alignment_file) if self.aligner is not None else None
            ),
            "rfm": {
                "iterations": self.config.iterations,
                "ridge": float(self.log_ridge.detach().exp()),
                "bandwidth_scales": [float(s) for s in self.log_bandwidth_scales.detach().exp()],
                "fit_dtype": self.config.fit_dtype,
            },
            "fits": fits,
        }
        if self.hparams.reader is not None:
            metadata["conditioned"] = {
                "reader": self.hparams.reader,
                "reader_file": READER_FILE,
                "classes": self.classes,
                "directions": "class 1" if self.classes == 2 else "one per class (one-vs-rest)",
                "concept": "the item's own gold class (prompt only, last prompt token)",
            }
        elif self.hparams.source == "expert":
            metadata["transfer"] = [
                self.transfer_entry(pair, vectors[pair[1]]) for pair in self.layer_pairs
            ]
        # Fitted on the module's device; written from the CPU.
        return SteeringVectors(
            {j: v.cpu() for j, v in vectors.items()},
            norm_scale,
            {j: rows.cpu() for j, rows in directions.items()},
            metadata,
        )

    @torch.no_grad()
    def transfer_entry(self, pair: tuple[int, int], mapped: torch.Tensor) -> dict:
        """Transfer diagnostics of the mapped direction at `pair`
        (`expertsteer.evaluation.transfer`):
        the alignment's map figures at the pair, and the direction against the target's own
        direction from the same extractor, the mapped-random null and random directions."""
        datamodule = self.trainer.datamodule
        _, target_key = datamodule.keys()
        i, j = pair
        index, column = self._encoder_index(i), target_key.layers.index(j)
        x, y = self._states("steer", "target", column)
        x_dev, y_dev = self._states("dev", "target", column)
        aligner = self.aligner.double()
        native = native_direction(self.hparams.method, x, y, x_dev, y_dev, seed=self.hparams.seed)
        null = mapped_random_directions(
            lambda v: aligner.encode_direction(index, v),
            aligner.expert_std[index],
            seed=self.hparams.seed,
        )
        figures = direction_diagnostics(
            mapped, native, null, x, y, x_dev, y_dev, seed=self.hparams.seed
        )
        maps = {
            (m["expert_layer"], m["target_layer"]): m
            for m in (self.alignment_meta or {}).get("pair_maps", [])
        }
        entry = {
            "expert_layer": i,
            "target_layer": j,
            "alignment": (self.alignment_meta or {}).get("objective"),
            **{
                k: v
                for k, v in maps.get((i, j), {}).items()
                if k not in ("expert_layer", "target_layer")
            },
            "extractor": self.hparams.method,
            "direction": figures,
            "verdict": transfer_verdict({self.hparams.method: figures})[self.hparams.method],
        }
        log.info("transfer at pair %s: %s", pair, figures)
        return entry

    def _reader_block(self) -> tuple[Any, int]:
        """The reader's capture key and block: the first pair's expert block, or its target
        block; with `reader_block: best` the block of the reader's model chosen by
        cross-validation on the steer split (computed once)."""
        expert_key, target_key = self.trainer.datamodule.keys()
        i, j = self.layer_pairs[0]
        key, paired = (expert_key, i) if self.hparams.reader == "expert" else (target_key, j)
        if self.hparams.reader_block == "paired":
            return key, paired
        if self.block_accuracies is None:
            tensors = self.trainer.datamodule.split_tensors("steer")
            states = tensors[self.hparams.reader]
            self.block_accuracies = reader_block_accuracies(
                {layer: states[:, n] for n, layer in enumerate(key.layers)},
                tensors["label"],
                self.classes,
                seed=self.hparams.seed,
            )
            log.info(
                "%s reader: block %d by %d-fold cross-validation on steer (paired block %d); "
                "accuracy per block %s",
                self.hparams.reader,
                best_block(self.block_accuracies),
                READER_FOLDS,
                paired,
                {layer: round(a, 3) for layer, a in self.block_accuracies.items()},
            )
        return key, best_block(self.block_accuracies)

    def _reader_states(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw states [n, d] the reader reads and the class labels of a split."""
        key, layer = self._reader_block()
        return self._states(split, self.hparams.reader, key.layers.index(layer))

    def reading(self) -> Reading:
        """The reader fitted on the steer split's class items, with its provenance."""
        datamodule = self.trainer.datamodule
        expert_key, target_key = datamodule.keys()
        key, layer = self._reader_block()
        x, y = self._reader_states("steer")
        metadata = {
            "reader": self.hparams.reader,
            "model_id": key.model_id,
            "weights_sha256": key.weights_sha256,
            "chat_template": key.chat_template,
            "layer": layer,
            "block_choice": self.hparams.reader_block,
            **(
                {"cv_accuracy": {str(b): a for b, a in self.block_accuracies.items()}}
                if self.block_accuracies is not None
                else {}
            ),
            "position": datamodule.hparams.position,
            "capture_dtype": datamodule.model_dtype(),
            "task": resolve_task(datamodule.hparams.task).name,
            **model_identity(expert_key, target_key),
        }
        return fit_reading(x.cpu(), y.cpu(), self.classes, metadata=metadata)

    def _states(self, split: str, side: str, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """States [n, d] of `side` (expert or target) at captured layer `column` and labels [n]
        of a split, moved from the cache (CPU) to where Lightning put the module and the
        auto-encoders with it: the rank's device."""
        tensors = self.trainer.datamodule.split_tensors(split)
        return tensors[side][:, column].to(self.device), tensors["label"].to(self.device)
