"""The Python API: load models, train steering vectors (target-native or from an expert through
token-level ridge maps), steer a plain transformers model, save and load the vectors.

    import expertsteer as es

    expert = es.load_model("qwen2.5-coder-0.5b-instruct")
    target = es.load_model("smollm2-135m-instruct")
    native = es.train_vector(target, positive_texts, negative_texts)
    mapping = es.fit_mapping(expert, target, corpus_texts)
    vector = es.train_expert_vector(expert, target, positive_texts, negative_texts, mapping)
    with vector.apply(target.model, alpha=0.3):
        print(target.generate(["Tell me about your day."]))

No Lightning: the API runs the method modules directly, and the vectors stage
(`lightning_modules.vectors.VectorsModule`) runs the same fitting steps
(`expertsteer.method.fitting.VectorFit`) on the same kind of states, so the same texts and
settings give the same vectors. The states are captured as the pipeline captures a concept
task's items: each text one user turn (the chat template when the model has one), pooled at
the `last` token or the `mean` over tokens; `s_j` is the mean norm of the target's states of
the validation texts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertsteer.data.activations import ModelKey
from expertsteer.data.token_pairs import (
    CorpusConfig,
    PairText,
    capture_token_pairs,
    heldout_texts,
    load_token_pairs,
)
from expertsteer.method.align import AffineAutoencoders, fit_translation, load_alignment
from expertsteer.method.align import save_alignment as save_alignment_artifact
from expertsteer.method.fitting import VectorFit, fit_record, norm_scale
from expertsteer.method.pair import same_depth
from expertsteer.method.rfm import VectorsConfig, tune_hyperparameters
from expertsteer.method.translate import TranslateConfig, token_rows
from expertsteer.method.vectors import SteeringVectors
from expertsteer.models.capture import POSITIONS, capture
from expertsteer.models.causal_lm import CausalLM

log = logging.getLogger(__name__)

__all__ = [
    "Mapping",
    "Model",
    "fit_mapping",
    "load_model",
    "train_expert_vector",
    "train_vector",
    "wrap_model",
]

METHODS = ("rfm", "mean_diff", "pca_diff", "logistic", "random")


@dataclass
class Model:
    """A causal LM ready for the API: the plain transformers `model` (steer it with
    `SteeringVectors.apply`), its `tokenizer`, and prompt formatting."""

    decoder: CausalLM
    """Block access and prompt formatting (chat template when the tokenizer has one)."""
    weights_sha256: str
    """Checksum identifying the weights (recorded in the vectors' metadata)."""

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model."""
        return self.decoder.hf_model

    @property
    def tokenizer(self) -> Any:
        return self.decoder.tokenizer

    @property
    def name(self) -> str:
        return self.decoder.name

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    @property
    def hidden_size(self) -> int:
        return self.decoder.hidden_size

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts as one user turn each (chat template when in use), left-padded: the inputs
        of `model.generate(**encoded)` or `model(**encoded)`."""
        return self.decoder.encode(_texts(prompts, "prompts"))

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 40, **generate_kwargs: Any
    ) -> list[str]:
        """Continuations of `prompts` from the plain transformers `generate` (greedy unless
        `generate_kwargs` say otherwise; steered inside `SteeringVectors.apply`), decoded
        without special tokens; one per returned sequence."""
        encoded = self.encode(prompts)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        ids = self.model.generate(**encoded, max_new_tokens=max_new_tokens, **generate_kwargs)
        new = ids[:, encoded["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def load_model(
    name: str,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    chat_template: bool | None = None,
) -> Model:
    """A packaged model name (`expertsteer models`), a `.gguf` file, a local model directory or
    (online) a hub id, loaded as `expertsteer.models.zoo.load_model` loads it."""
    from expertsteer.models import zoo

    loaded = zoo.load_model(name, dtype=dtype, device=device)
    return Model(CausalLM.from_loaded(loaded, chat_template), zoo.weights_identity(name))


def wrap_model(
    model: torch.nn.Module,
    tokenizer: Any,
    name: str | None = None,
    chat_template: bool | None = None,
) -> Model:
    """An already loaded transformers causal LM and its tokenizer (the tokenizer is set to
    left padding, with pad = eos when it has no pad token)."""
    decoder = CausalLM(model, tokenizer, chat_template, name=name)
    return Model(decoder, f"unhashed:{decoder.name}")


# -- data --------------------------------------------------------------------------------------


def _texts(texts: Sequence[str] | str, name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of texts, not one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{name} must be a non-empty list of non-empty texts")
    return texts


@dataclass
class _Split:
    """Texts with labels (1 positive, 0 negative) for fitting and for validation."""

    fit: list[str]
    fit_labels: torch.Tensor
    val: list[str]
    val_labels: torch.Tensor


def split_texts(
    positive: Sequence[str],
    negative: Sequence[str],
    validation: tuple[Sequence[str], Sequence[str]] | None = None,
    validation_fraction: float = 0.25,
    seed: int = 0,
) -> _Split:
    """Fit and validation texts: `validation` (positive, negative) when given, else a seeded
    `validation_fraction` of each class (at least one text per class on each side)."""
    positive, negative = _texts(positive, "positive"), _texts(negative, "negative")
    if validation is not None:
        val_pos = _texts(validation[0], "validation positives")
        val_neg = _texts(validation[1], "validation negatives")
        fit_pos, fit_neg = positive, negative
    else:
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if min(len(positive), len(negative)) < 2:
            raise ValueError(
                "give at least 2 positive and 2 negative texts (one of each is held out to "
                "validate the fit), or pass validation=(positives, negatives)"
            )
        rng = random.Random(seed)

        def part(texts: list[str]) -> tuple[list[str], list[str]]:
            order = list(range(len(texts)))
            rng.shuffle(order)
            count = min(len(texts) - 1, max(1, round(validation_fraction * len(texts))))
            held = set(order[:count])
            return (
                [t for k, t in enumerate(texts) if k not in held],
                [t for k, t in enumerate(texts) if k in held],
            )

        fit_pos, val_pos = part(positive)
        fit_neg, val_neg = part(negative)

    def labels(pos: list[str], neg: list[str]) -> torch.Tensor:
        return torch.tensor([1] * len(pos) + [0] * len(neg), dtype=torch.long)

    return _Split(
        fit_pos + fit_neg, labels(fit_pos, fit_neg), val_pos + val_neg, labels(val_pos, val_neg)
    )


def default_layer(model: Model) -> int:
    """The block steered when none is named: a third of the way up (the middle third of the
    network is where concept directions steer best; e.g. block 10 of SmolLM2-135M's 30)."""
    return model.num_layers // 3


def _check_settings(method: str, position: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")


def _states(
    model: Model, texts: list[str], layers: list[int], position: str, batch_size: int
) -> dict[int, torch.Tensor]:
    return capture(model.decoder, texts, layers, position, batch_size=batch_size)


# -- vectors -----------------------------------------------------------------------------------


def fit_vectors(
    fit: VectorFit,
    pairs: list[tuple[int | None, int]],
    source_fit: dict[int, torch.Tensor],
    source_val: dict[int, torch.Tensor],
    split: _Split,
    target_val: dict[int, torch.Tensor],
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, float], list[dict]]:
    """Per pair (source layer, target layer j): the unit vector, its alternatives and s_j,
    by the stage's steps (`VectorFit`), from states keyed by layer; and each pair's fit record.

    The source layer is the expert's for expert vectors, j itself for target-native ones."""
    config = fit.config
    data = []
    for pair in pairs:
        source = pair[1] if fit.source == "target" else pair[0]
        x = fit.features(pair, source_fit[source])
        x_val = fit.features(pair, source_val[source])
        data.append((x, split.fit_labels, x_val, split.val_labels))
    if fit.method == "rfm" and config.tune_steps:
        log_scales, log_ridge = tune_hyperparameters(
            data,
            torch.tensor(config.bandwidth_scales, dtype=torch.float64).log(),
            torch.tensor(math.log(config.ridge), dtype=torch.float64),
            steps=config.tune_steps,
            lr=config.tune_lr,
            center=config.center,
        )
        fit = dataclasses.replace(
            fit,
            config=dataclasses.replace(
                config,
                ridge=float(log_ridge.exp()),
                bandwidth_scales=tuple(float(s) for s in log_scales.exp()),
            ),
        )
    vectors, directions, scales, records = {}, {}, {}, []
    for pair, (x, y, x_val, y_val) in zip(pairs, data, strict=True):
        j = pair[1]
        if j in vectors:
            raise ValueError(f"target layer {j} appears in more than one pair")
        rows, result = fit.directions(x, y, x_val, y_val)
        mapped = fit.target_rows(pair, rows, x, y)
        vectors[j], directions[j] = mapped[0].float().cpu(), mapped.float().cpu()
        scales[j] = norm_scale(target_val[j])
        records.append(fit_record(pair, result))
    return vectors, directions, scales, records


def _metadata(
    fit: VectorFit,
    target: Model,
    pairs: list[tuple[int | None, int]],
    records: list[dict],
    split: _Split,
    position: str,
    expert: Model | None = None,
    mapping: Mapping | None = None,
) -> dict[str, Any]:
    config = fit.config
    metadata: dict[str, Any] = {
        "method": fit.method,
        "source": fit.source,
        "space": fit.space,
        "target_model_id": target.name,
        "target_weights_sha256": target.weights_sha256,
        "pairs": [list(pair) for pair in pairs],
        "positions": "all",
        "pooling": position,
        "norm_scale": "mean L2 norm of the target block output on the validation texts",
        "data": {
            "fit": len(split.fit),
            "validation": len(split.val),
            "fingerprint": _fingerprint(split.fit + split.val),
        },
        "rfm": {
            "iterations": config.iterations,
            "ridge": config.ridge,
            "bandwidth_scales": list(config.bandwidth_scales),
            "fit_dtype": config.fit_dtype,
        },
        "fits": records,
        "made_by": "expertsteer.api",
    }
    if expert is not None:
        metadata |= {
            "expert_model_id": expert.name,
            "expert_weights_sha256": expert.weights_sha256,
            "alignment_objective": "translate",
            "mapping": None if mapping is None else mapping.summary(),
        }
    return metadata


def _fingerprint(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def train_vector(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int] | None = None,
    method: str = "mean_diff",
    position: str = "mean",
    validation: tuple[Sequence[str], Sequence[str]] | None = None,
    validation_fraction: float = 0.25,
    config: VectorsConfig | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> SteeringVectors:
    """Target-native steering vectors: the direction separating `positive` from `negative`
    texts in `model`'s own states at each of `layers` (default: `default_layer`).

    Args:
        model: The model to steer (`load_model` / `wrap_model`).
        positive: Texts of the concept to steer towards (label 1).
        negative: Texts of its opposite (label 0).
        layers: Decoder blocks to fit a vector for (negative counts from the end).
        method: `mean_diff` (CAA), `rfm` (the paper's Recursive Feature Machine),
            `pca_diff`, `logistic` or `random` (a control).
        position: Pooling of each text's states: the `mean` over its tokens (the default: a
            concept lives in every word of a sentence) or its `last` token (the pipeline's
            default, for prompt + answer items).
        validation: (positives, negatives) for the RFM's selection and s_j; default: a
            seeded `validation_fraction` of each class is held out.
        validation_fraction: Share of each class held out when `validation` is not given.
        config: RFM settings and fit precision (`VectorsConfig`; its `space` is ignored).
        seed: Seed of the held-out draw and of the `random` control.
        batch_size: Texts per captured forward.
    """
    _check_settings(method, position)
    split = split_texts(positive, negative, validation, validation_fraction, seed)
    chosen = model.decoder.check_layers([default_layer(model)] if layers is None else list(layers))
    fit = VectorFit(method, "target", config or VectorsConfig(), seed=seed)
    fit_states = _states(model, split.fit, chosen, position, batch_size)
    val_states = _states(model, split.val, chosen, position, batch_size)
    pairs: list[tuple[int | None, int]] = [(None, j) for j in chosen]
    vectors, directions, scales, records = fit_vectors(
        fit, pairs, fit_states, val_states, split, val_states
    )
    metadata = _metadata(fit, model, pairs, records, split, position)
    return SteeringVectors(vectors, scales, directions, metadata)


# -- the expert's side ---------------------------------------------------------------------------


@dataclass
class Mapping:
    """Token-level ridge maps (the `translate` alignment) from expert blocks into target
    blocks: `aligner` holds one encoder per entry of `expert_layers`, fitted into the target
    block its pair names."""

    aligner: AffineAutoencoders
    """Standardisation and maps, one auto-encoder per expert layer."""
    pairs: list[tuple[int, int]]
    """(expert block, target block) pairs the maps serve (one target block per expert block)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Models, layers, per-pair held-out R^2 (`pair_maps`), positions and texts used."""

    @property
    def expert_layers(self) -> list[int]:
        return list(self.metadata["expert_layers"])

    def summary(self) -> dict[str, Any]:
        """What a steering artifact records of the mapping it was made through."""
        return {
            "pairs": [list(pair) for pair in self.pairs],
            "pair_maps": self.metadata.get("pair_maps", []),
            "positions": self.metadata.get("positions"),
            "data_fingerprint": self.metadata.get("data_fingerprint"),
        }

    def save(self, path: str | Path) -> Path:
        """Write as an `alignment.safetensors` artifact (loadable by the pipeline's stages)."""
        return save_alignment_artifact(path, self.aligner, self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> Mapping:
        aligner, metadata = load_alignment(path)
        pairs = [(int(i), int(j)) for i, j in metadata.get("translation_pairs", [])]
        if metadata.get("objective") != "translate" or not pairs:
            raise ValueError(f"{path} is not a mapping of `fit_mapping` (translate maps)")
        return cls(aligner, pairs, metadata)


def fit_mapping(
    expert: Model,
    target: Model,
    texts: Sequence[str],
    pairs: Sequence[tuple[int, int]] | None = None,
    target_layers: Sequence[int] | None = None,
    max_tokens: int = 96,
    heldout: float = 0.2,
    config: TranslateConfig | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> Mapping:
    """Ridge maps from expert states to target states on token positions both tokenizers end
    at the same character of `texts` (`expertsteer.data.token_pairs`), one per pair, fitted
    in closed form with lambda chosen on held-out texts (`expertsteer.method.translate`).

    Args:
        expert: The expert model.
        target: The target model.
        texts: Raw texts both models read (hundreds give tens of thousands of positions).
        pairs: (expert block, target block) pairs; default: each of `target_layers` paired
            with the expert block at the same relative depth.
        target_layers: Target blocks when `pairs` is not given (default: `default_layer`).
        max_tokens: Texts are truncated to this many tokens on each side.
        heldout: Share of texts held out to choose lambda and report R^2.
        config: Ridge settings (`TranslateConfig`: lambda grid, rank).
        batch_size: Texts per captured forward.
        seed: Seed of the held-out draw.
    """
    texts = _texts(texts, "texts")
    config = config or TranslateConfig(seed=seed)
    if pairs is None:
        chosen = target.decoder.check_layers(
            [default_layer(target)] if target_layers is None else list(target_layers)
        )
        expert_blocks = list(range(expert.num_layers))
        pairs = [
            (same_depth(j, target.num_layers, expert_blocks, expert.num_layers), j) for j in chosen
        ]
    pairs = [
        (expert.decoder.check_layers([i])[0], target.decoder.check_layers([j])[0]) for i, j in pairs
    ]
    expert_layers = sorted({i for i, _ in pairs})
    target_layers = sorted({j for _, j in pairs})
    if len(expert_layers) != len(pairs):
        raise ValueError(
            f"pairs {pairs} map one expert block into several target blocks; each map has one "
            "target: use one pair per expert block"
        )
    keys = {
        "expert": ModelKey(expert.name, expert.weights_sha256, tuple(expert_layers), None),
        "target": ModelKey(target.name, target.weights_sha256, tuple(target_layers), None),
    }
    items = [PairText(f"text:{k}", (text,), formatted=False) for k, text in enumerate(texts)]
    corpus = CorpusConfig(
        tasks=[], size=len(items), max_tokens=max_tokens, steer_items=False, heldout=heldout
    )
    with tempfile.TemporaryDirectory(prefix="expertsteer-pairs-") as directory:
        meta = capture_token_pairs(
            Path(directory),
            {"expert": expert.decoder, "target": target.decoder},
            keys,
            items,
            corpus,
            "float32",
            batch_size,
        )
        states = load_token_pairs(Path(directory), meta)
    held = heldout_texts(meta["texts"], heldout, seed)[states["text"]]
    rows = token_rows({**states, "heldout": held, "positions": meta["positions"]}, config)
    aligner = AffineAutoencoders(len(expert_layers), expert.hidden_size, target.hidden_size)
    targets = [target_layers.index(dict(pairs)[i]) for i in expert_layers]
    results = fit_translation(
        aligner, states["expert"], states["target"], rows["fit"], rows["heldout"], targets, config
    )
    pair_maps = [
        {
            "expert_layer": i,
            "target_layer": dict(pairs)[i],
            "lambda": result.lam,
            "heldout_r2": result.heldout_r2,
            "shuffled_r2": result.shuffled_r2,
        }
        for i, result in zip(expert_layers, results, strict=True)
    ]
    for entry in pair_maps:
        log.info(
            "map expert block %d -> target block %d: held-out R^2 %.3f (shuffled %.3f)",
            entry["expert_layer"],
            entry["target_layer"],
            entry["heldout_r2"],
            entry["shuffled_r2"],
        )
    metadata = {
        "expert_model_id": expert.name,
        "expert_weights_sha256": expert.weights_sha256,
        "target_model_id": target.name,
        "target_weights_sha256": target.weights_sha256,
        "expert_layers": expert_layers,
        "target_layers": target_layers,
        "objective": "translate",
        "translation_pairs": [list(pair) for pair in sorted(pairs)],
        "data_fingerprint": _fingerprint(texts),
        "pair_maps": pair_maps,
        "positions": int(meta["positions"]),
        "texts": len(texts),
        "max_tokens": max_tokens,
    }
    return Mapping(aligner, sorted(pairs), metadata)


def train_expert_vector(
    expert: Model,
    target: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    mapping: Mapping,
    method: str = "rfm",
    space: str = "encoded",
    position: str = "mean",
    validation: tuple[Sequence[str], Sequence[str]] | None = None,
    validation_fraction: float = 0.25,
    config: VectorsConfig | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> SteeringVectors:
    """ExpertSteer vectors: the direction separating `positive` from `negative` texts in the
    EXPERT's states at each pair's expert block, brought into the target's block by `mapping`.

    Args:
        expert: The expert model (the one `mapping` maps from).
        target: The target model (s_j is measured on its states).
        positive: Texts of the concept (label 1).
        negative: Texts of its opposite (label 0).
        mapping: Maps from `fit_mapping` (or `Mapping.load`).
        method: `rfm` (the paper), `mean_diff`, `pca_diff`, `logistic` or `random`.
        space: Fit on the `encoded` expert states (the paper) or on the `raw` ones, then map
            the direction by the encoder's linear part.
        position: Pooling of each text's states: `mean` over tokens (default) or `last` token.
        validation: (positives, negatives) for selection and s_j; default: a seeded
            `validation_fraction` of each class.
        validation_fraction: Share of each class held out when `validation` is not given.
        config: RFM settings and fit precision (`VectorsConfig`; `space` overrides its own).
        seed: Seed of the held-out draw and of the `random` control.
        batch_size: Texts per captured forward.
    """
    _check_settings(method, position)
    for role, model, field_name in (("expert", expert, "expert"), ("target", target, "target")):
        recorded = mapping.metadata.get(f"{field_name}_model_id")
        if recorded is not None and recorded != model.name:
            raise ValueError(
                f"the mapping was fitted for {role} {recorded!r}, not {model.name!r}; fit one "
                "for these models"
            )
    if mapping.aligner.expert_dim != expert.hidden_size:
        raise ValueError(
            f"the mapping reads {mapping.aligner.expert_dim}-d expert states; "
            f"{expert.name!r} has {expert.hidden_size}"
        )
    split = split_texts(positive, negative, validation, validation_fraction, seed)
    config = dataclasses.replace(config or VectorsConfig(), space=space)
    # A copy: the fit casts its aligner to the fit precision in place.
    aligner = copy.deepcopy(mapping.aligner)
    fit = VectorFit(method, "expert", config, aligner, mapping.expert_layers, seed)
    pairs: list[tuple[int | None, int]] = list(mapping.pairs)
    expert_layers = sorted({i for i, _ in mapping.pairs})
    target_layers = sorted({j for _, j in mapping.pairs})
    fit_states = _states(expert, split.fit, expert_layers, position, batch_size)
    val_states = _states(expert, split.val, expert_layers, position, batch_size)
    target_val = _states(target, split.val, target_layers, position, batch_size)
    vectors, directions, scales, records = fit_vectors(
        fit, pairs, fit_states, val_states, split, target_val
    )
    metadata = _metadata(fit, target, pairs, records, split, position, expert, mapping)
    return SteeringVectors(vectors, scales, directions, metadata)
