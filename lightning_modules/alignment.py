"""Stage 1: train the per-layer auto-encoders, then estimate MI and pick intervention pairs.

`trainer.fit(AlignmentModule(...), datamodule=PairedActivationDataModule(...))`:

* `configure_model` builds the auto-encoders from the data module's dims and captured layers
  and fits their standardisation on the whole steer split (`split_tensors`: every example once,
  identical on every rank, so every rank computes the same statistics without a collective).
* Training minimises the reconstruction loss, plus `lambda_tr` times the translation loss on the
  configured pairs for `objective: recon+translate`.
* Each validation epoch logs the losses and per-layer explained variance (a TorchMetrics metric
  whose sums are all-reduced across ranks; Lightning's distributed sampler may pad the last
  batch with a few duplicates, which this monitoring metric tolerates), then, outside the
  sanity check and without a token corpus, the MI matrix between encoded expert states and
  target states on the whole dev split (again `split_tensors`, identical on every rank: each
  rank computes the same matrix and no gather is needed) and the pairs it selects. With a
  corpus the MI (on held-out token positions) is computed once, when fitting ends.
* When fitting ends, the weights of the best checkpoint (if a `ModelCheckpoint` monitors a
  metric; otherwise the last weights) are restored, MI and pairs are recomputed for exactly
  those weights, and rank 0 writes `alignment.safetensors`, `mi.safetensors`, `pairs.json` and
  `mi_heatmap.png` into `output_dir`; the other ranks wait at a barrier.

In `recon+translate` mode the translation pairs are fixed by the configuration (typically the
`pairs.json` of a paper-faithful `recon` run): the MI computed here is saved for information
but never feeds back into the objective, which would be circular (the encoder would be trained
towards the pairs its own codes select).

With a token-level corpus on the data module (`corpus`, see `expertsteer.data.token_pairs`):

* the held-out R^2 of a ridge map for every (expert layer, target layer in the window) is
  computed once in `configure_model` (`expertsteer.method.translate.r2_matrix`: "translatability",
  the score of `select: translatable`, saved and drawn beside the MI);
* MI is estimated on held-out token positions (thousands of rows instead of the dev split's
  hundred prompts, where canonical correlations saturate) and beside it on the same rows with
  the pairing shuffled, the estimator's floor;
* `objective: translate` fits every encoder in closed form
  (`expertsteer.method.translate.fit_pair`):
  a ridge map from the standardised expert states of layer i into the target's states of
  layer j (the configured pair's, else the layer with the best held-out R^2), the decoder its
  back-map. The fit needs one epoch and no optimizer step (`automatic_optimization` off).

Every chosen pair's map is reported on held-out token positions (`heldout_r2`, `shuffled_r2`),
on held-out steer items' positions (`steer_items_r2`) and on the dev split's sequence-level
states (`dev_items_r2`), in `pairs.json` and the alignment metadata.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from expertsteer.artifacts import (
    ALIGNMENT_FILE,
    MI_FILE,
    MI_HEATMAP_FILE,
    PAIRS_FILE,
    R2_HEATMAP_FILE,
    save_artifact,
    save_json,
)
from expertsteer.data.activations import model_identity
from expertsteer.evaluation.plots import mi_heatmap
from expertsteer.method.align import (
    IDENTITY_FIELDS,
    OBJECTIVES,
    AffineAutoencoders,
    Objective,
    TrainingConfig,
    explained_variance,
    explained_variance_from_sums,
    fit_translation,
    layer_moments,
    save_alignment,
)
from expertsteer.method.pair import (
    MIConfig,
    PairingConfig,
    mi_matrix,
    pair_indices,
    pairs_payload,
    read_pairs_file,
    same_depth,
    select_pairs,
    window_mask,
)
from expertsteer.method.translate import (
    TranslateConfig,
    r2_matrix,
    r2_score,
    target_moments,
    token_rows,
)
from expertsteer.settings import check_choice, settings_of

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "expertsteer_alignment"
"""Checkpoint entry holding the auto-encoder shapes and run metadata (the parameters are built
from the data, so a checkpoint must say how to rebuild them before its state dict loads)."""
ENCODE_CHUNK = 1024
MATRIX_STD_FLOOR = 1e-6
"""Absolute floor of the standard deviations that standardise the R^2 matrix's expert states."""


class LayerExplainedVariance(Metric):
    """Per-layer 1 - SSE / SST of reconstructions in standardised space, from float64 sums."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_layers: int, dim: int) -> None:
        super().__init__()
        zeros = torch.zeros(num_layers, dtype=torch.float64)
        self.add_state("squared_error", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_layers, dim, dtype=torch.float64), "sum")
        self.add_state("total_sq", torch.zeros(num_layers, dim, dtype=torch.float64), "sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reconstruction: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add a batch: reconstructions and standardised inputs, both [B, L, d]."""
        x = inputs.detach().double()
        self.squared_error += (reconstruction.detach().double() - x).pow(2).sum(dim=(0, 2))
        self.total += x.sum(0)
        self.total_sq += x.pow(2).sum(0)
        self.count += x.shape[0]

    def compute(self) -> torch.Tensor:
        if self.count < 2:
            return torch.full_like(self.squared_error, float("nan"))
        return explained_variance_from_sums(
            self.squared_error, self.total, self.total_sq, float(self.count)
        )


class AlignmentModule(L.LightningModule):
    """Affine auto-encoders for every captured expert layer, then MI-based layer pairing."""

    def __init__(
        self,
        objective: Objective = "recon",
        pairs: list[list[int]] | None = None,
        pairs_file: str | None = None,
        output_dir: str | None = None,
        training: TrainingConfig = TrainingConfig(),  # noqa: B008 (frozen: one shared default)
        mi: MIConfig = MIConfig(),  # noqa: B008
        pairing: PairingConfig = PairingConfig(),  # noqa: B008
        translate: TranslateConfig = TranslateConfig(),  # noqa: B008
        refine: bool = False,
        keep_all_layers: bool = False,
    ) -> None:
        """
        Args:
            objective: `recon` (paper-faithful), `recon+translate` (adds the translation
                term on `pairs`) or `translate` (closed-form ridge maps on the data module's
                token-level corpus; `pairs` optional).
            pairs: [expert_layer, target_layer] pairs (real layer numbers) for the translation
                term; required for `recon+translate` unless `pairs_file` is given.
            pairs_file: A `pairs.json` (e.g. of a `recon` run) to take the pairs from.
            output_dir: Where the artifacts go (default: the trainer's `default_root_dir`).
            training: How the auto-encoders are trained by gradient (`TrainingConfig`:
                AdamW learning rate and weight decay, schedule, weight of the translation
                term).
            mi: The MI estimate (`MIConfig`: estimator, PCA rank, ...).
            pairing: How pairs are chosen from it (`PairingConfig`: `top_k`, depth windows,
                `select`: `lowest_mi` (the paper), `translatable` (best held-out R^2 of a
                ridge map; needs a corpus) or `dev` (`candidates` lowest-MI pairs are saved,
                for the evaluation to choose among on dev)).
            translate: Ridge settings (`TranslateConfig`: lambda grid, rank, rows of the R^2
                matrix and of the held-out MI); used whenever the data module has a corpus.
            refine: With `translate`: after the closed form, train the same auto-encoders by
                gradient on `recon_loss + lambda_tr * translate_loss` (every expert layer into
                its target layer) — the path for corpora too large for a closed form, and the
                one DDP shares out; give the data module `train_on: tokens`.
            keep_all_layers: Save every expert layer's auto-encoder in `alignment.safetensors`
                (default: only the layers of the pairs the run uses — 4 MB instead of ~100 MB
                for the packaged pair).
        """
        super().__init__()
        self.training_config = settings_of(TrainingConfig, training)
        self.mi_config = settings_of(MIConfig, mi)
        self.pairing_config = settings_of(PairingConfig, pairing)
        self.translate_config = settings_of(TranslateConfig, translate)
        # Plain dicts in the hyperparameters keep checkpoints loadable with weights_only.
        training, mi = asdict(self.training_config), asdict(self.mi_config)
        pairing, translate = asdict(self.pairing_config), asdict(self.translate_config)
        self.save_hyperparameters()
        check_choice("objective", objective, OBJECTIVES)
        self.translation_layers, self.pairs_identity = self._configured_pairs(
            objective, pairs, pairs_file
        )
        if refine and objective != "translate":
            raise ValueError("refine applies to objective 'translate' only")
        self.automatic_optimization = objective != "translate" or refine
        self.autoencoders: AffineAutoencoders | None = None
        self.val_explained_variance: LayerExplainedVariance | None = None
        self.run_metadata: dict[str, Any] = {}
        self.translation_pairs: list[tuple[int, int]] = []
        self.mi: torch.Tensor | None = None
        self.mi_shuffled: torch.Tensor | None = None
        self.r2: torch.Tensor | None = None
        self.layer_fits: dict[int, dict[str, Any]] = {}
        self.tokens: dict[str, torch.Tensor] | None = None
        self.selected_pairs: list[tuple[int, int]] = []

    @staticmethod
    def _configured_pairs(
        objective: str, pairs: list[list[int]] | None, pairs_file: str | None
    ) -> tuple[list[tuple[int, int]], dict[str, Any]]:
        """The translation pairs (real layer numbers; none for `recon`) of `pairs` or
        `pairs_file`, and the model identity the pairs file records."""
        if pairs is not None and pairs_file is not None:
            raise ValueError("give either pairs or pairs_file, not both")
        identity: dict[str, Any] = {}
        if pairs_file is not None:
            pairs, identity = read_pairs_file(pairs_file)
        if pairs is not None and (
            not pairs
            or any(len(pair) != 2 or not all(isinstance(x, int) for x in pair) for pair in pairs)
        ):
            raise ValueError(
                f"pairs must be a non-empty list of [expert_layer, target_layer], got {pairs}"
            )
        if objective == "recon+translate" and pairs is None:
            raise ValueError(
                "objective 'recon+translate' needs the translation pairs: set pairs "
                "[[expert_layer, target_layer], ...] or pairs_file (the pairs.json of a "
                "'recon' run)"
            )
        if objective == "recon" and pairs is not None:
            log.warning("objective 'recon' ignores the translation pairs %s", pairs)
        if objective == "recon" or pairs is None:
            return [], identity
        return [(int(i), int(j)) for i, j in pairs], identity

    # -- building ----------------------------------------------------------------------------

    def _build(self, num_layers: int, expert_dim: int, target_dim: int) -> None:
        self.autoencoders = AffineAutoencoders(num_layers, expert_dim, target_dim)
        self.val_explained_variance = LayerExplainedVariance(num_layers, expert_dim)

    def _datamodule(self) -> Any:
        datamodule = self.trainer.datamodule
        if datamodule is None or not all(
            hasattr(datamodule, name) for name in ("split_tensors", "keys", "dims", "cache_path")
        ):
            raise TypeError(
                "AlignmentModule needs a PairedActivationDataModule: call "
                "trainer.fit(module, datamodule=PairedActivationDataModule(...))"
            )
        return datamodule

    @staticmethod
    def describe(datamodule: Any) -> dict[str, Any]:
        """What the alignment depends on: models, captured layers, dims and data fingerprint."""
        expert, target = datamodule.keys()
        dims = datamodule.dims()
        return {
            **model_identity(expert, target),
            "expert_layers": list(expert.layers),
            "target_layers": list(target.layers),
            "expert_dim": int(dims["expert"][0]),
            "target_dim": int(dims["target"][0]),
            "expert_num_layers": int(dims["expert"][1]),
            "target_num_layers": int(dims["target"][1]),
            "data_fingerprint": datamodule.cache_path().name,
        }

    def _check_identity(self, found: dict[str, Any], source: str) -> None:
        for name in IDENTITY_FIELDS:
            if self.run_metadata.get(name) != found.get(name):
                raise ValueError(
                    f"{source} has {name}={found.get(name)!r} but this module was built for "
                    f"{self.run_metadata.get(name)!r}; use the matching data module / checkpoint"
                )

    def _layers(self) -> dict[str, Any]:
        """The captured layers and the models' depths, as `expertsteer.method.pair` takes
        them."""
        meta = self.run_metadata
        return {
            "expert_layers": meta["expert_layers"],
            "target_layers": meta["target_layers"],
            "num_expert_layers": meta["expert_num_layers"],
            "num_target_layers": meta["target_num_layers"],
        }

    def configure_model(self) -> None:
        """Build the auto-encoders from the data module and fit their standardisation.

        Idempotent. Without a trainer (`load_from_checkpoint`) nothing is built here:
        `on_load_checkpoint` rebuilds the modules from the shapes stored in the checkpoint.
        """
        if self._trainer is None:
            return
        datamodule = self._datamodule()
        metadata = self.describe(datamodule)
        if self.autoencoders is not None:
            self._check_identity(metadata, "the data module")
            return
        steer = datamodule.split_tensors("steer")
        expert_states, target_states = steer["expert"].float(), steer["target"].float()
        self._check_pairs_file(metadata)
        self.run_metadata = metadata
        self.translation_pairs = pair_indices(self.translation_layers, **self._layers())
        corpus = getattr(datamodule, "corpus", None)
        self._check_settings(has_corpus=corpus is not None)
        self._build(len(metadata["expert_layers"]), metadata["expert_dim"], metadata["target_dim"])
        if corpus is not None:
            self.tokens = token_rows(datamodule.token_pairs(), self.translate_config)
            if self.translate_config.matrix:
                self.r2 = self._r2_matrix()
            elif self.pairing_config.select == "translatable":
                raise ValueError("select 'translatable' needs translate.matrix: true")
        if self.hparams.objective == "translate":
            self._fit_translation()
        else:
            self.autoencoders.fit_standardisation(expert_states)
            for i, j in self.translation_pairs:
                self.autoencoders.fit_target_standardisation(i, target_states[:, j])
        log.info(
            "alignment: %d auto-encoders %d -> %d, standardised on %d steer examples",
            len(metadata["expert_layers"]),
            metadata["expert_dim"],
            metadata["target_dim"],
            expert_states.shape[0],
        )

    def _check_pairs_file(self, metadata: dict[str, Any]) -> None:
        """The pairs file must have been made for the data module's models."""
        for name, value in self.pairs_identity.items():
            if value != metadata[name]:
                raise ValueError(
                    f"pairs_file {self.hparams.pairs_file} was made with {name}={value!r}, "
                    f"but the data module has {metadata[name]!r}; use the pairs of this model pair"
                )

    def _check_settings(self, has_corpus: bool) -> None:
        """Fail now, not after an epoch: settings that need a token corpus, and depth windows
        that hold no captured layer."""
        if not has_corpus and (
            self.hparams.objective == "translate" or self.pairing_config.select == "translatable"
        ):
            raise ValueError(
                f"objective '{self.hparams.objective}' with select "
                f"'{self.pairing_config.select}' needs paired token states: set the data "
                "module's `corpus` option (e.g. `corpus: {}` for the defaults)"
            )
        meta = self.run_metadata
        shape = (len(meta["expert_layers"]), len(meta["target_layers"]))
        self._select(torch.zeros(shape), torch.zeros(shape))

    # -- token-level corpus ------------------------------------------------------------------

    def _window_columns(self) -> torch.Tensor:
        """Which captured target layers lie in the pairing window (bool [L_T])."""
        meta = self.run_metadata
        return window_mask(
            len(meta["target_layers"]),
            meta["target_layers"],
            meta["target_num_layers"],
            self.pairing_config.window,
            "target",
        )

    def _r2_matrix(self) -> torch.Tensor:
        """Held-out R^2 [L_E, L_T] of a ridge map per pair (target layers of the window)."""
        tokens, config = self.tokens, self.translate_config
        fit, heldout = tokens["matrix_fit"], tokens["matrix_heldout"]
        mean, std = layer_moments(tokens["expert"][fit], MATRIX_STD_FLOOR, relative=False)
        mean, std = mean.float(), std.float()
        result = r2_matrix(
            (tokens["expert"][fit].float() - mean) / std,
            tokens["target"][fit],
            (tokens["expert"][heldout].float() - mean) / std,
            tokens["target"][heldout],
            config.lambdas,
            columns=self._window_columns(),
            seed=config.seed,
        )
        log.info(
            "translatability: held-out R^2 of ridge maps, best %.3f, median %.3f (%d pairs)",
            float(result.r2.nan_to_num(-math.inf).max()),
            float(result.r2.nanmedian()),
            int(torch.isfinite(result.r2).sum()),
        )
        return result.r2

    @torch.no_grad()
    def _fit_translation(self) -> None:
        """Closed-form encoders and decoders for every expert layer (objective `translate`)."""
        tokens, meta = self.tokens, self.run_metadata
        targets = [self._translation_target(i) for i in range(self.autoencoders.num_layers)]
        results = fit_translation(
            self.autoencoders,
            tokens["expert"],
            tokens["target"],
            tokens["fit"],
            tokens["heldout"],
            targets,
            self.translate_config,
        )
        for i, (j, result) in enumerate(zip(targets, results, strict=True)):
            self.layer_fits[i] = {
                "expert_layer": meta["expert_layers"][i],
                "target_layer": meta["target_layers"][j],
                "target_index": j,
                "lambda": result.lam,
                "heldout_r2": result.heldout_r2,
                "shuffled_r2": result.shuffled_r2,
            }
        log.info(
            "translate: %d ridge maps fitted on %d token positions (%d held out)",
            len(self.layer_fits),
            len(tokens["fit"]),
            len(tokens["heldout"]),
        )

    def _translation_target(self, i: int) -> int:
        """Target layer index of expert layer i's map: its configured pair's, else the best
        held-out R^2, else (no R^2 matrix) the layer at the same relative depth."""
        chosen = dict(self.translation_pairs)
        if i in chosen:
            return chosen[i]
        if self.r2 is not None:
            return int(self.r2[i].nan_to_num(-math.inf).argmax())
        meta = self.run_metadata
        return same_depth(
            meta["expert_layers"][i],
            meta["expert_num_layers"],
            meta["target_layers"],
            meta["target_num_layers"],
        )

    def _encode_on_cpu(self, i: int, states: torch.Tensor) -> torch.Tensor:
        """Codes (float64, CPU) of expert layer i's cached states [n, d_E], encoded where the
        auto-encoders are (the rank's device once Lightning moved the module)."""
        return self.autoencoders.encode(i, states.to(self.device, self.dtype)).double().cpu()

    @torch.no_grad()
    def map_r2(self, i: int, j: int) -> dict[str, float]:
        """How well encoder i predicts target layer j: R^2 on held-out token positions, the
        same with the rows' pairing shuffled, on held-out steer items' positions (token corpus
        only), and on the dev split's sequence-level states. The target is standardised as
        the translation term sees it (fit rows' mean, one scalar scale)."""
        datamodule = self._datamodule()
        dev = datamodule.split_tensors("dev")
        tokens = self.tokens
        mean, scale = target_moments(
            datamodule.split_tensors("steer")["target"][:, j]
            if tokens is None
            else tokens["target"][tokens["fit"], j]
        )
        out: dict[str, float] = {}
        if tokens is not None:

            def r2(rows: torch.Tensor, shuffle: bool = False) -> float | None:
                if len(rows) < 2:
                    return None
                code = self._encode_on_cpu(i, tokens["expert"][rows, i])
                goal = (tokens["target"][rows, j].double() - mean) / scale
                if shuffle:
                    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
                    goal = goal[order]
                return r2_score(code, goal)

            fit = None if self.hparams.refine else self.layer_fits.get(i)
            if fit is not None and fit["target_index"] == j:
                out["heldout_r2"], out["shuffled_r2"] = fit["heldout_r2"], fit["shuffled_r2"]
            else:
                out["heldout_r2"] = r2(tokens["heldout"])
                out["shuffled_r2"] = r2(tokens["heldout"], shuffle=True)
            out["steer_items_r2"] = r2(tokens["steer_heldout"])
            out["positions"] = len(tokens["fit"])
        code = self._encode_on_cpu(i, dev["expert"][:, i])
        out["dev_items_r2"] = r2_score(code, (dev["target"][:, j].double() - mean) / scale)
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "metadata": self.run_metadata,
            "translation_pairs": [list(pair) for pair in self.translation_pairs],
            "mi": None if self.mi is None else self.mi.tolist(),
            "mi_shuffled": None if self.mi_shuffled is None else self.mi_shuffled.tolist(),
            "r2": None if self.r2 is None else self.r2.tolist(),
            "layer_fits": {str(i): fit for i, fit in self.layer_fits.items()},
            "selected_pairs": [list(pair) for pair in self.selected_pairs],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                f"this checkpoint has no '{CHECKPOINT_KEY}' entry; it was not written by "
                "AlignmentModule"
            )
        metadata = state["metadata"]
        if self.autoencoders is None:
            self.run_metadata = metadata
            self._build(
                len(metadata["expert_layers"]), metadata["expert_dim"], metadata["target_dim"]
            )
            self.translation_pairs = [tuple(pair) for pair in state["translation_pairs"]]
        else:
            self._check_identity(metadata, "the checkpoint")
            if metadata["data_fingerprint"] != self.run_metadata["data_fingerprint"]:
                log.warning(
                    "resuming from a checkpoint trained on other data (%s, now %s)",
                    metadata["data_fingerprint"],
                    self.run_metadata["data_fingerprint"],
                )
        for name in ("mi", "mi_shuffled", "r2"):
            if state.get(name) is not None:
                setattr(self, name, torch.tensor(state[name], dtype=torch.float64))
        self.layer_fits = {int(i): fit for i, fit in state.get("layer_fits", {}).items()}
        self.selected_pairs = [tuple(pair) for pair in state["selected_pairs"]]

    # -- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any] | None:
        if not self.automatic_optimization:
            return None  # closed form (configure_model); the epoch only runs validation
        training = self.training_config
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=training.lr, weight_decay=training.weight_decay
        )
        if training.scheduler == "none":
            return {"optimizer": optimizer}
        steps = self.trainer.estimated_stepping_batches
        if not 0 < steps < float("inf"):
            raise ValueError(
                "scheduler 'cosine' needs a finite run: set trainer max_epochs or max_steps, "
                "or use scheduler 'none'"
            )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    def translation_targets(self) -> list[tuple[int, int]]:
        """(expert, target) index pairs of the translation term: the configured pairs, or
        with `translate` every expert layer and the target layer its map was fitted into."""
        if self.hparams.objective == "translate":
            return [(i, fit["target_index"]) for i, fit in sorted(self.layer_fits.items())]
        return self.translation_pairs

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        expert = batch["expert"].to(self.dtype)
        losses = {"recon_loss": self.autoencoders.reconstruction_loss(expert).mean()}
        targets = self.translation_targets()
        if targets:
            target = batch["target"].to(self.dtype)
            losses["translate_loss"] = self.autoencoders.translation_loss(
                expert, target, targets
            ).mean()
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not self.automatic_optimization:
            return None  # fitted in closed form in configure_model
        losses = self._losses(batch)
        lambda_tr = self.training_config.lambda_tr
        loss = losses["recon_loss"] + lambda_tr * losses.get("translate_loss", 0.0)
        size = batch["expert"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=size, prog_bar=True)
        self.log("train/loss", loss, batch_size=size)
        return loss

    # -- validation and pairing --------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        size = batch["expert"].shape[0]
        for name, value in self._losses(batch).items():
            self.log(f"val/{name}", value, batch_size=size, sync_dist=True, prog_bar=True)
        expert = batch["expert"].to(self.dtype)
        _, reconstruction = self.autoencoders(expert)
        self.val_explained_variance.update(reconstruction, self.autoencoders.standardise(expert))

    def on_validation_epoch_end(self) -> None:
        variance = self.val_explained_variance.compute().float()
        self.val_explained_variance.reset()
        for layer, value in zip(self.run_metadata["expert_layers"], variance, strict=True):
            self.log(f"val/explained_variance/layer_{layer}", value, sync_dist=True)
        self.log("val/explained_variance_min", variance.min(), sync_dist=True)
        self.log("val/explained_variance_median", variance.quantile(0.5), sync_dist=True)
        # On the dev split MI is cheap and logged per epoch; on thousands of held-out token
        # positions (54 PCA decompositions per estimate) it is computed once, at fit end.
        if not self.trainer.sanity_checking and self.tokens is None:
            self.compute_pairs()

    @torch.no_grad()
    def encode_all(self, expert_states: torch.Tensor) -> torch.Tensor:
        """Codes [n, L_E, d_T] (float32, CPU) of raw expert states [n, L_E, d_E], in chunks."""
        codes = [
            self.autoencoders(chunk.to(self.device, self.dtype))[0].float().cpu()
            for chunk in expert_states.split(ENCODE_CHUNK)
        ]
        return torch.cat(codes)

    @torch.no_grad()
    def mi_states(self, expert_states: torch.Tensor) -> torch.Tensor:
        """The codes z_i = f_i(h) as MI sees them: their decoded images g_i(z_i) in
        standardised expert coordinates [n, L_E, d_E] (float32, CPU), in chunks.

        g_i is injective on the codes' span, so MI(g_i(z_i); h_T) = MI(z_i; h_T). The reason
        for the detour: the estimators truncate by PCA, and PCA is not invariant to the
        non-orthogonal basis a reconstruction-only auto-encoder leaves arbitrary — two equally
        good encoders (e.g. a 1-process and a 2-process fit) would give different MI. In
        decoded coordinates the estimate depends only on the learned subspace.
        """
        images = [
            self.autoencoders(chunk.to(self.device, self.dtype))[1].float().cpu()
            for chunk in expert_states.split(ENCODE_CHUNK)
        ]
        return torch.cat(images)

    def compute_pairs(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """MI [L_E, L_T] between encoded expert and target states, the same with the rows'
        pairing shuffled (the estimator's floor), and the selected (expert, target) index
        pairs; stored on the module (codes enter through `mi_states`).

        States: held-out token positions of the corpus when there is one, else the whole dev
        split. Every rank reads the same rows and computes the same matrix: no collective.
        Runs after every validation epoch; cheap for `gaussian`, one O(n^2) pass per layer
        pair for `ksg` (set `check_val_every_n_epoch` accordingly).
        """
        if self.tokens is not None:
            rows = self.tokens["matrix_heldout"]
            expert, target = self.tokens["expert"][rows], self.tokens["target"][rows]
        else:
            dev = self._datamodule().split_tensors("dev")
            expert, target = dev["expert"], dev["target"]
        codes, target = self.mi_states(expert.float()), target.float()
        order = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
        self.mi = mi_matrix(codes, target, self.mi_config)
        self.mi_shuffled = mi_matrix(codes, target[order], self.mi_config)
        self.selected_pairs = self._select(self.mi, self.r2)
        log.info(
            "MI pairing (expert, target layers): %s",
            [self._real(pair) for pair in self.selected_pairs],
        )
        return self.mi, self.selected_pairs

    def _select(self, mi: torch.Tensor, r2: torch.Tensor | None) -> list[tuple[int, int]]:
        return select_pairs(mi, self.pairing_config, **self._layers(), r2=r2)

    def _real(self, pair: tuple[int, int]) -> tuple[int, int]:
        return (
            self.run_metadata["expert_layers"][pair[0]],
            self.run_metadata["target_layers"][pair[1]],
        )

    # -- artifacts ---------------------------------------------------------------------------

    def _restore_best(self) -> dict[str, Any]:
        """Load the monitored best checkpoint's weights, if any; say which weights are kept."""
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.monitor is None or not callback.best_model_path:
            return {"weights": "last", "epoch": self.current_epoch}
        checkpoint = self.trainer.strategy.load_checkpoint(callback.best_model_path)
        self.load_state_dict(checkpoint["state_dict"])
        return {
            "weights": "best",
            "epoch": int(checkpoint["epoch"]),
            "monitor": callback.monitor,
            "best_score": None
            if callback.best_model_score is None
            else float(callback.best_model_score),
            "checkpoint": str(callback.best_model_path),
        }

    def on_fit_end(self) -> None:
        kept = self._restore_best()
        self.compute_pairs()
        if self.trainer.is_global_zero:
            directory = Path(self.hparams.output_dir or self.trainer.default_root_dir)
            self.write_artifacts(directory, kept)
        self.trainer.strategy.barrier("alignment_artifacts")

    def write_artifacts(self, directory: Path, kept: dict[str, Any]) -> None:
        """Alignment weights, MI matrix, pairs and heatmaps of the current weights."""
        meta = self.run_metadata
        identity = {name: meta[name] for name in (*IDENTITY_FIELDS, "data_fingerprint")}
        self._save_alignment(directory / ALIGNMENT_FILE, identity, kept)
        self._save_mi(directory / MI_FILE, identity)
        self._save_pairs(directory / PAIRS_FILE, identity)
        self._save_heatmaps(directory)
        log.info("alignment artifacts written to %s (%s weights)", directory, kept["weights"])

    def _save_alignment(self, path: Path, identity: dict[str, Any], kept: dict[str, Any]) -> None:
        """The auto-encoders of the expert layers the pairs use (every layer with
        `keep_all_layers`), with their dev explained variance and each pair's map figures."""
        meta = self.run_metadata
        dev = self._datamodule().split_tensors("dev")
        autoencoders = copy.deepcopy(self.autoencoders).float().cpu()
        variance = explained_variance(autoencoders, dev["expert"].float())
        mapped = list(dict.fromkeys([*self.translation_pairs, *self.selected_pairs]))
        kept_layers = (
            list(range(autoencoders.num_layers))
            if self.hparams.keep_all_layers
            else sorted({i for i, _ in mapped})
        )
        autoencoders = autoencoders.subset(kept_layers)
        pair_maps = [
            {
                "expert_layer": self._real(pair)[0],
                "target_layer": self._real(pair)[1],
                **self.map_r2(*pair),
            }
            for pair in mapped
        ]
        save_alignment(
            path,
            autoencoders,
            {
                **identity,
                "expert_layers": [meta["expert_layers"][i] for i in kept_layers],
                "captured_expert_layers": meta["expert_layers"],
                "objective": self.hparams.objective,
                "lambda_tr": self.training_config.lambda_tr,
                "translation_pairs": [list(self._real(pair)) for pair in self.translation_pairs],
                "dev_explained_variance": [round(float(variance[i]), 6) for i in kept_layers],
                "pair_maps": pair_maps,
                "layer_fits": [self.layer_fits[i] for i in sorted(self.layer_fits)],
                "corpus_positions": None if self.tokens is None else int(self.tokens["positions"]),
                **kept,
            },
        )

    def _save_mi(self, path: Path, identity: dict[str, Any]) -> None:
        """The MI matrix, its shuffled-pairs floor and the R^2 matrix (those computed)."""
        meta = self.run_metadata
        matrices = {"mi": self.mi, "mi_shuffled": self.mi_shuffled, "r2": self.r2}
        save_artifact(
            path,
            "mi",
            {
                **{name: value for name, value in matrices.items() if value is not None},
                "expert_layers": torch.tensor(meta["expert_layers"]),
                "target_layers": torch.tensor(meta["target_layers"]),
            },
            {
                **identity,
                "estimator": self.mi_config.estimator,
                "mi_rank": self.mi_config.mi_rank,
                "states": "encoded expert vs target",
                "split": "held-out token positions" if self.tokens is not None else "dev",
                "r2": "held-out R^2 of a ridge map per pair (window only)",
                "objective": self.hparams.objective,
            },
        )

    def _save_pairs(self, path: Path, identity: dict[str, Any]) -> None:
        """The selected pairs with their MI, shuffled MI and R^2 (`pairs.json`)."""
        meta = self.run_metadata
        payload = pairs_payload(
            self.mi,
            self.selected_pairs,
            self.mi_config,
            self.pairing_config,
            meta["expert_layers"],
            meta["target_layers"],
            extra={"mi_shuffled": self.mi_shuffled, "translatability_r2": self.r2},
        )
        save_json(path, {**payload, **identity, "kind": "pairs"})

    def _save_heatmaps(self, directory: Path) -> None:
        """The MI heatmap and, when the R^2 matrix was computed, the R^2 heatmap, with the
        selected pairs marked."""
        meta = self.run_metadata
        names = (Path(meta["expert_model_id"]).name, Path(meta["target_model_id"]).name)
        layers = {"expert_layers": meta["expert_layers"], "target_layers": meta["target_layers"]}
        mi_heatmap(self.mi, self.selected_pairs, directory / MI_HEATMAP_FILE, *names, **layers)
        if self.r2 is not None:
            mi_heatmap(
                self.r2,
                self.selected_pairs,
                directory / R2_HEATMAP_FILE,
                *names,
                **layers,
                label="held-out R^2",
                title="Ridge-map R^2",
            )
