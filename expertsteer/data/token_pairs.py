"""Paired expert / target states at token level, across two different tokenizers.

The sequence-level states of the steering items are a few hundred rows — too few to tie a
d_E -> d_T map to the target's coordinates. Token positions give tens of thousands: for a text
seen by both models, a position of the expert's tokenization and one of the target's are
*paired* when both tokens end at the same character offset of a text segment the two models
share. Up to that character both models have read the same words, so their residual states
describe the same prefix.

Texts come in two kinds:

* raw corpus texts (no chat template): the whole text is the one shared segment;
* the task's own steer-split items (prompt + answer, chat-formatted per model as at capture
  time): each model's chat template wraps the text differently, so the shared segments are the
  user prompt and the completion, located in each formatted string; offsets are compared
  relative to the segment's start in each string.

Tokens of zero width (special tokens, template markers) are never paired. The corpus never
contains the run's dev or test items: generic texts come from *other* tasks' training pools,
and the task itself contributes its steer split only.

A capture is cached like the sequence-level activations: fingerprinted by both models, layers,
storage dtype and every text, written in shards of `shard_texts` texts under temporary names,
`meta.json` last (with every shard's sha256, checked on load), resumable shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nnsight
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from expertsteer.cache import atomic_file, file_lock, sha256_file
from expertsteer.data.activations import STORAGE_DTYPES, CacheMismatchError, ModelKey
from expertsteer.data.prompts import Item, answer_text, render_prompt
from expertsteer.errors import ExpertSteerError
from expertsteer.models.batching import token_batches
from expertsteer.models.causal_lm import CausalLM, block_hidden
from expertsteer.settings import check_bool, check_integer, check_number

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META = "meta.json"
DEFAULT_CORPUS_TASKS = ("gsm8k", "boolq", "pubmedqa", "openbookqa", "fiqa_sa")
"""Generic pool: training texts of tasks from four domains (math, general, medical, science,
finance), none of them a task the benchmarks report; the run's own task is always left out."""
SOURCES = {"corpus": 0, "steer": 1}


class TokenPairError(ExpertSteerError):
    """Texts or settings from which no paired token states can be made."""


@dataclass
class CorpusConfig:
    """Where paired token states come from (`alignment.corpus` of an experiment)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_CORPUS_TASKS))
    """Built-in tasks whose non-test pools give the generic texts (the run's task is dropped)."""
    files: list[str] = field(default_factory=list)
    """Extra text files: `.txt` (one text per line) or `.jsonl` (a `text` field per row)."""
    size: int = 500
    """Generic texts taken, round-robin over the tasks and files (seeded)."""
    max_tokens: int = 96
    """Generic texts are truncated to this many tokens on each side."""
    steer_items: bool = True
    """Add the task's own steer-split items (chat-formatted as at capture)."""
    heldout: float = 0.2
    """Fraction of texts (not positions) held out for choosing lambda and reporting R^2."""
    shard_texts: int = 64
    """Texts per cache shard (the unit of resume)."""
    skip_first: int = 1
    """Positions below this token index are never paired: the first token of a sequence is
    an attention sink whose residual norm is orders of magnitude above the rest."""

    def __post_init__(self) -> None:
        for name in ("tasks", "files"):
            values = getattr(self, name)
            if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"corpus.{name} must be a list of names, got {values!r}")
        check_integer("corpus.size", self.size, 0)
        check_integer("corpus.max_tokens", self.max_tokens, 2)
        check_number("corpus.heldout", self.heldout)
        if not 0.0 < self.heldout < 1.0:
            raise ValueError(f"corpus.heldout must be in (0, 1), got {self.heldout}")
        check_bool("corpus.steer_items", self.steer_items)
        check_integer("corpus.shard_texts", self.shard_texts, 1)
        check_integer("corpus.skip_first", self.skip_first, 0)
        if self.size == 0 and not self.steer_items:
            raise ValueError("corpus is empty: set corpus.size > 0 or corpus.steer_items: true")
        self.tasks, self.files = list(self.tasks), list(self.files)


@dataclass(frozen=True)
class PairText:
    """One text both models read."""

    id: str
    """Unique id (task and example id, or file and line)."""
    segments: tuple[str, ...]
    """Raw: the text itself. Formatted: the user prompt and the completion."""
    formatted: bool
    """Chat-formatted per model (steer items) or raw text."""


# -- texts -----------------------------------------------------------------------------------


def _file_texts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenPairError(f"corpus file {path} cannot be read as UTF-8 text: {error}") from error
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as error:
                raise TokenPairError(
                    f"corpus file {path}, line {number}: expected a JSON object with a 'text' "
                    f"field ({error})"
                ) from error
        return texts
    return [line for line in lines if line.strip()]


def _task_texts(name: str, data_root: str) -> list[str]:
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.tasks import load_task

    task = load_task(resolve_task(name), data_root)
    pools = [p for key, p in task.pools.items() if key != "test" or len(task.pools) == 1]
    texts = []
    for example in (e for pool in pools for e in pool):
        text = render_prompt(task.type, example)
        if example.answer is not None and task.type not in ("concept", "behaviour"):
            text = f"{text}\n{answer_text(task.type, example, example.answer)}"
        texts.append(text)
    return texts


def corpus_texts(config: CorpusConfig, task: str, data_root: str, seed: int = 0) -> list[PairText]:
    """The generic texts of `config` for a run on `task` (which is left out), seeded."""
    sources: list[tuple[str, list[str]]] = []
    for name in config.tasks:
        if name != task:
            sources.append((name, _task_texts(name, data_root)))
    for name in config.files:
        sources.append((Path(name).name, _file_texts(Path(name).expanduser())))
    rng = random.Random(seed)
    queues = []
    for name, texts in sources:
        order = list(range(len(texts)))
        rng.shuffle(order)
        queues.append([(f"{name}:{k}", texts[k]) for k in order])
    picked: list[PairText] = []
    while len(picked) < config.size and any(queues):
        for queue in queues:
            if queue and len(picked) < config.size:
                text_id, text = queue.pop()
                picked.append(PairText(text_id, (text,), formatted=False))
    if config.size and not picked:
        raise TokenPairError(
            f"corpus tasks {config.tasks} (without '{task}') and files {config.files} hold no text"
        )
    return picked


def steer_texts(items: Sequence[Item]) -> list[PairText]:
    """The steer-split items as chat-formatted texts (prompt and, if any, completion shared)."""
    return [
        PairText(
            f"steer:{item.id}",
            (item.prompt, item.completion) if item.completion else (item.prompt,),
            formatted=True,
        )
        for item in items
    ]


# -- pairing ---------------------------------------------------------------------------------


def segment_spans(formatted: str, segments: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character spans of `segments`, found in order in `formatted`; None if one is missing
    (a chat template that rewrites the text)."""
    spans, start = [], 0
    for segment in segments:
        if not segment:
            continue
        at = formatted.find(segment, start)
        if at < 0:
            return None
        spans.append((at, at + len(segment)))
        start = at + len(segment)
    return spans


def _relative_ends(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], int]:
    """(segment, end offset relative to its start) -> token index, for tokens of nonzero width
    that end inside a segment."""
    ends = {}
    for index, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        for k, (lo, hi) in enumerate(spans):
            if lo < end <= hi:
                ends[(k, end - lo)] = index
                break
    return ends


def paired_positions(
    offsets_a: Sequence[tuple[int, int]],
    spans_a: Sequence[tuple[int, int]],
    offsets_b: Sequence[tuple[int, int]],
    spans_b: Sequence[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Token index pairs (a, b) whose tokens end at the same offset of the same segment."""
    if len(spans_a) != len(spans_b):
        raise ValueError(f"{len(spans_a)} segments on one side, {len(spans_b)} on the other")
    ends_a = _relative_ends(offsets_a, spans_a)
    ends_b = _relative_ends(offsets_b, spans_b)
    return sorted((ends_a[key], ends_b[key]) for key in ends_a.keys() & ends_b.keys())


@dataclass
class Tokenized:
    """One side's tokenization of every text."""

    input_ids: list[list[int]]
    offsets: list[list[tuple[int, int]]]
    spans: list[list[tuple[int, int]] | None]


def tokenize_texts(decoder: CausalLM, texts: Sequence[PairText], max_tokens: int) -> Tokenized:
    """Token ids, character offsets and shared-segment spans of every text on one side.

    Raw texts get the tokenizer's own special tokens and are truncated to `max_tokens`;
    formatted texts are the exact strings capture uses (`CausalLM.format`), never truncated.
    """
    tokenizer = decoder.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise TokenPairError(
            f"the tokenizer of '{decoder.name}' is not a fast tokenizer; token pairing needs "
            "character offsets (offset_mapping)"
        )
    ids, offsets, spans = [], [], []
    for text in texts:
        if text.formatted:
            completions = [text.segments[1]] if len(text.segments) > 1 else None
            string = decoder.format([text.segments[0]], completions)[0]
            encoding = tokenizer(
                string,
                add_special_tokens=not decoder.use_chat_template,
                return_offsets_mapping=True,
            )
            spans.append(segment_spans(string, text.segments))
        else:
            string = text.segments[0]
            encoding = tokenizer(
                string, truncation=True, max_length=max_tokens, return_offsets_mapping=True
            )
            spans.append([(0, len(string))])
        ids.append(list(encoding["input_ids"]))
        offsets.append([tuple(pair) for pair in encoding["offset_mapping"]])
    return Tokenized(ids, offsets, spans)


def pair_texts(
    expert: Tokenized, target: Tokenized, skip_first: int = 0
) -> list[list[tuple[int, int]]]:
    """Paired token indices per text (empty where a template hides a segment); pairs with a
    token index below `skip_first` on either side are dropped."""
    pairs = []
    for k in range(len(expert.input_ids)):
        spans_e, spans_t = expert.spans[k], target.spans[k]
        if spans_e is None or spans_t is None or len(spans_e) != len(spans_t):
            pairs.append([])
            continue
        found = paired_positions(expert.offsets[k], spans_e, target.offsets[k], spans_t)
        pairs.append([(a, b) for a, b in found if min(a, b) >= skip_first])
    return pairs


# -- capture ---------------------------------------------------------------------------------


@torch.inference_mode()
def capture_positions(
    decoder: CausalLM,
    input_ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
) -> torch.Tensor:
    """States [sum of len(positions), L, d] of `layers` at the given token positions of each
    sequence, from one left-padded traced forward that stops after the deepest layer."""
    pad = decoder.tokenizer.pad_token_id
    width = max(len(ids) for ids in input_ids)
    batch = torch.full((len(input_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, ids in enumerate(input_ids):
        batch[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    blocks = decoder.blocks()
    with decoder.lm.trace(input_ids=batch.to(decoder.device), attention_mask=mask) as tracer:
        saved = nnsight.save([block_hidden(blocks[layer].output) for layer in layers])
        tracer.stop()
    rows = torch.tensor(
        [r for r, p in enumerate(positions) for _ in p], dtype=torch.long, device=saved[0].device
    )
    columns = torch.tensor(
        [width - len(input_ids[r]) + q for r, p in enumerate(positions) for q in p],
        dtype=torch.long,
        device=saved[0].device,
    )
    states = torch.stack([hidden[rows, columns] for hidden in saved], dim=1).cpu()
    if not torch.isfinite(states).all():
        raise FloatingPointError(
            f"non-finite activations of '{decoder.name}' during token-pair capture (NaN or inf); "
            "check the model weights and dtype"
        )
    return states


def fingerprint(
    expert: ModelKey, target: ModelKey, dtype: str, config: CorpusConfig, texts: list[PairText]
) -> str:
    digest = hashlib.sha256()
    header = {
        "version": FORMAT_VERSION,
        "expert": asdict(expert),
        "target": asdict(target),
        "dtype": dtype,
        "max_tokens": config.max_tokens,
        "shard_texts": config.shard_texts,
        "skip_first": config.skip_first,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for text in texts:
        digest.update(json.dumps([text.id, list(text.segments), text.formatted]).encode())
    return digest.hexdigest()[:32]


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"pairs-{index:05d}.safetensors"


def capture_token_pairs(
    directory: Path,
    decoders: dict[str, CausalLM],
    keys: dict[str, ModelKey],
    texts: list[PairText],
    config: CorpusConfig,
    storage_dtype: str,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Capture (or resume) the paired token states of `texts` into `directory`; its meta.

    Each shard holds `expert [n, L_E, d_E]`, `target [n, L_T, d_T]` and `text [n]` (the index
    of the text each paired position belongs to). A forward holds `batch_size` texts, fewer
    where `max_tokens` caps its padded size (`expertsteer.models.batching.token_batches`).
    """
    if not texts:
        raise TokenPairError("no texts to pair")
    started = time.perf_counter()
    dtype = STORAGE_DTYPES[storage_dtype]
    tokenized = {
        side: tokenize_texts(decoders[side], texts, config.max_tokens)
        for side in ("expert", "target")
    }
    pairs = pair_texts(tokenized["expert"], tokenized["target"], config.skip_first)
    shards = [
        (index, range(start, min(start + config.shard_texts, len(texts))))
        for index, start in enumerate(range(0, len(texts), config.shard_texts))
    ]
    rows_per_shard = [sum(len(pairs[k]) for k in span) for _, span in shards]
    todo = [(index, span) for index, span in shards if not _shard_path(directory, index).is_file()]
    groups = {
        index: _length_batches(tokenized, pairs, span, batch_size, max_tokens)
        for index, span in todo
    }
    total_batches = sum(len(batches) for batches in groups.values())
    with tqdm(total=total_batches, desc="capture token pairs", unit="batch") as bar:
        for index, _ in todo:
            tensors = _capture_shard(
                decoders, keys, tokenized, pairs, groups[index], dtype, storage_dtype, bar
            )
            with atomic_file(_shard_path(directory, index)) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    positions = sum(rows_per_shard)
    if positions == 0:
        raise TokenPairError(
            "no token positions pair between the two tokenizers in any text; check that both "
            "chat templates keep the prompt text verbatim"
        )
    meta = _token_meta(
        directory, decoders, keys, texts, tokenized, pairs, rows_per_shard, storage_dtype, started
    )
    with atomic_file(directory / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    log.info(
        "token pairs: %d positions from %d texts (%d without pairs) in %.1f s",
        positions,
        len(texts),
        meta["texts_without_pairs"],
        meta["capture_seconds"],
    )
    return meta


def _length_batches(
    tokenized: dict[str, Tokenized],
    pairs: list[list[tuple[int, int]]],
    span: range,
    batch_size: int,
    max_tokens: int | None,
) -> list[list[int]]:
    """The texts of `span` that have pairs, in forwards of texts of similar length (the longer
    side's tokens): batches of similar length waste little on padding."""

    def longest(k: int) -> int:
        return max(len(tokenized[side].input_ids[k]) for side in tokenized)

    order = sorted((k for k in span if pairs[k]), key=longest)
    return [
        [order[n] for n in group]
        for group in token_batches([longest(k) for k in order], batch_size, max_tokens)
    ]


def _capture_shard(
    decoders: dict[str, CausalLM],
    keys: dict[str, ModelKey],
    tokenized: dict[str, Tokenized],
    pairs: list[list[tuple[int, int]]],
    batches: list[list[int]],
    dtype: torch.dtype,
    storage_dtype: str,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """One shard's `expert`, `target` and `text` rows, captured batch by batch (one tick of
    `bar` each) and returned to text order."""
    parts: dict[str, list[torch.Tensor]] = {"expert": [], "target": []}
    text_index: list[int] = []
    for batch in batches:
        for side, column in (("expert", 0), ("target", 1)):
            if batch:
                parts[side].append(
                    capture_positions(
                        decoders[side],
                        [tokenized[side].input_ids[k] for k in batch],
                        [[pair[column] for pair in pairs[k]] for k in batch],
                        keys[side].layers,
                    )
                )
                if not torch.isfinite(parts[side][-1].to(dtype)).all():
                    raise FloatingPointError(
                        f"{side} states overflow storage dtype {storage_dtype}; use float32 storage"
                    )
                parts[side][-1] = parts[side][-1].to(dtype)
        text_index += [k for k in batch for _ in pairs[k]]
        bar.update(1)
    restore = torch.tensor(text_index, dtype=torch.long).argsort(stable=True)
    text_index = sorted(text_index)
    parts = {side: [torch.cat(rows)[restore]] if rows else [] for side, rows in parts.items()}
    tensors = {
        side: torch.cat(parts[side])
        if parts[side]
        else torch.zeros(0, len(keys[side].layers), decoders[side].hidden_size, dtype=dtype)
        for side in ("expert", "target")
    }
    tensors["text"] = torch.tensor(text_index, dtype=torch.long)
    return tensors


def _token_meta(
    directory: Path,
    decoders: dict[str, CausalLM],
    keys: dict[str, ModelKey],
    texts: list[PairText],
    tokenized: dict[str, Tokenized],
    pairs: list[list[tuple[int, int]]],
    rows_per_shard: list[int],
    storage_dtype: str,
    started: float,
) -> dict[str, Any]:
    """`meta.json` of a complete capture: both models, every text and its source, the rows
    and sha256 of every shard, and what the capture found and took."""
    return {
        "expert": {**vars(keys["expert"]), "hidden_size": decoders["expert"].hidden_size},
        "target": {**vars(keys["target"]), "hidden_size": decoders["target"].hidden_size},
        "texts": [text.id for text in texts],
        "sources": [SOURCES["steer" if text.formatted else "corpus"] for text in texts],
        "shard_rows": rows_per_shard,
        "shard_sha256": [
            sha256_file(_shard_path(directory, index)) for index in range(len(rows_per_shard))
        ],
        "positions": sum(rows_per_shard),
        "texts_without_pairs": sum(1 for p in pairs if not p),
        "tokens": {side: sum(len(ids) for ids in tokenized[side].input_ids) for side in tokenized},
        "storage_dtype": storage_dtype,
        "capture_seconds": round(time.perf_counter() - started, 2),
    }


def read_token_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CacheMismatchError(f"unreadable token-pair metadata {path}: {error}") from error


def load_token_pairs(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every shard of a complete capture: `expert`, `target`, `text` (global text index) and
    `source` (0 corpus, 1 steer item), checked against `meta`."""
    parts: dict[str, list[torch.Tensor]] = {"expert": [], "target": [], "text": []}
    checksums = meta.get("shard_sha256")
    if checksums is None:
        log.warning("token-pair cache %s records no shard checksums; read unchecked", directory)
    for index, rows in enumerate(meta["shard_rows"]):
        path = _shard_path(directory, index)
        if checksums is not None and path.is_file() and sha256_file(path) != checksums[index]:
            raise CacheMismatchError(
                f"token-pair shard {path} differs from the one recorded when it was captured "
                f"(sha256); delete {directory} to capture again"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in parts:
                    parts[key].append(handle.get_tensor(key))
        except Exception as error:
            raise CacheMismatchError(
                f"cannot read token-pair shard {path}: {error}; delete {directory} to capture again"
            ) from error
        if parts["text"][-1].shape[0] != rows:
            raise CacheMismatchError(
                f"token-pair shard {path} holds {parts['text'][-1].shape[0]} rows, metadata says "
                f"{rows}; delete {directory} to capture again"
            )
    out = {key: torch.cat(value) for key, value in parts.items()}
    out["source"] = torch.tensor(meta["sources"], dtype=torch.long)[out["text"]]
    return out


def ensure_token_pairs(
    root: Path,
    keys: dict[str, ModelKey],
    texts: list[PairText],
    config: CorpusConfig,
    storage_dtype: str,
    load_decoders: Any,
    batch_size: int = 8,
    max_tokens: int | None = None,
    model_dtype: str = "float32",
) -> Path:
    """Directory of the complete capture of `texts`, capturing missing shards first (under a
    lock; `load_decoders()` is called only when something is missing). A `model_dtype` other
    than float32 (the dtype the models run in) gives an entry of its own."""
    digest = fingerprint(keys["expert"], keys["target"], storage_dtype, config, texts)
    if model_dtype != "float32":
        digest = hashlib.sha256(f"{digest}\0model_dtype\0{model_dtype}".encode()).hexdigest()
        digest = digest[:32]
    directory = root / "token_pairs" / digest
    if read_token_meta(directory) is not None:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f"{directory.name}.lock"):
        if read_token_meta(directory) is None:
            capture_token_pairs(
                directory,
                load_decoders(),
                keys,
                texts,
                config,
                storage_dtype,
                batch_size,
                max_tokens,
            )
    return directory


def text_group(text_id: str) -> str:
    """Texts held out together: a steer example's correct and wrong items share a prompt."""
    return text_id[:-1] if text_id.startswith("steer:") and text_id[-1] in "+-" else text_id


def heldout_texts(text_ids: Sequence[str], fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean mask [len(text_ids)] of held-out texts. Whole texts (positions of one text are
    correlated), and whole groups (`text_group`), never straddle the split."""
    groups = sorted({text_group(text_id) for text_id in text_ids})
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {groups[k] for k in order[: max(1, round(fraction * len(groups)))]}
    mask = torch.tensor([text_group(text_id) in held for text_id in text_ids], dtype=torch.bool)
    if mask.all():
        raise TokenPairError(
            f"{len(groups)} text group(s) leave nothing to fit after holding out some"
        )
    return mask
