"""Many steering configurations from one shared trunk: the forwards behind grid scoring.

A configuration (an `Intervention`) first changes the residual stream at the output of its
lowest steered block j, so every block up to and including j computes the same states under
every configuration (and unsteered). For a batch of rows and a list of configurations:

1. *Prefix.* The rows' longest common token prefix (the chat template and the task's
   instruction), kept strictly inside every row's prompt, is forwarded once per configuration
   (its steering depends only on the positions mode: every prefix token is a prompt token) and
   its keys / values are kept in a `PrefixStore` that the caller carries across batches. Rows
   then forward only their remaining tokens, attending to the stored keys and values.
2. *Trunk.* One unsteered forward of the rows' remaining tokens stops after the deepest block
   any configuration branches at, keeping the output of each block j where one does.
3. *Branches.* Per group of configurations branching at block j (several configurations stacked
   along the batch, `config_batch` at a time): blocks 0..j are skipped (block j returns the
   trunk's output), the additions are applied by forward hooks on the steered blocks, and
   blocks j+1.. and the LM head run as usual.

Everything above block j is the model's own code (attention masks, rotary or absolute
positions, final norm), run through the model's forward; blocks are skipped by swapping their
`forward` for the duration of one call. The additions are the same tensors, added the same
way (`hidden + weight * added`), as `steering.steered_logits` adds them through nnsight, and
the scores equal that path's (tests/evaluation/test_branching.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from expertsteer.method.steer import Intervention, position_mask
from expertsteer.models.causal_lm import CausalLM, block_hidden

__all__ = ["Branch", "PrefixStore", "branch_of", "grid_log_probs"]

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values `[1, heads, p, head_dim]` per block of one forwarded prefix."""


@dataclass(frozen=True)
class Branch:
    """One configuration, resolved for a decoder: what is added where, and where it branches."""

    additions: dict[int, torch.Tensor]
    """Block -> alpha * s_j * v `[d]` (a conditioned configuration: `[R, 1, d]`, one per
    row) in the model's dtype (empty: the unsteered model)."""
    positions: str
    """Steered positions (`steering.POSITIONS`)."""
    branch: int
    """The lowest steered block (the last block when nothing is added)."""
    fingerprint: tuple
    """Identifies the additions and positions (keys the prefix store)."""


def branch_of(decoder: CausalLM, intervention: Intervention | None) -> Branch:
    """Resolve `intervention` (checked as `Intervention.additions` checks it; None or alpha 0:
    unsteered) into a `Branch`."""
    last = decoder.num_layers - 1
    if intervention is None:
        return Branch({}, "all", last, ())
    additions = intervention.additions(decoder) if intervention.active else {}
    if not additions:
        return Branch({}, intervention.positions, last, ())
    fingerprint = (
        intervention.positions,
        *((layer, _bytes(added)) for layer, added in additions.items()),
    )
    return Branch(additions, intervention.positions, min(additions), fingerprint)


def _bytes(values: torch.Tensor) -> bytes:
    """The exact bytes of `values` in any dtype (NumPy has no bfloat16)."""
    return values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@dataclass
class PrefixStore:
    """Keys and values of forwarded prefixes, per (prefix tokens, configuration); carry one per
    decoder across the batches of an evaluation."""

    states: dict[tuple[tuple[int, ...], tuple], KV] = field(default_factory=dict)
    """(prefix token ids, `Branch.fingerprint`) -> keys / values per block."""
    prefixes: list[tuple[int, ...]] = field(default_factory=list)
    """Prefixes forwarded so far, in order (later batches reuse one that still fits)."""

    def choose_prefix(self, rows: list[list[int]], limit: int) -> tuple[int, ...]:
        """The longest known prefix shared by every row and at most `limit` long, else the
        rows' longest common prefix cut at `limit`."""
        known = [
            prefix
            for prefix in self.prefixes
            if len(prefix) <= limit and all(row[: len(prefix)] == list(prefix) for row in rows)
        ]
        if known:
            return max(known, key=len)
        shared = min(_common_length(rows[0], row) for row in rows)
        prefix = tuple(rows[0][: min(shared, limit)])
        if prefix:
            self.prefixes.append(prefix)
        return prefix


def _common_length(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class _Stop(Exception):
    """Ends a trunk forward after the deepest block it is needed for."""


@contextmanager
def _hooks(decoder: CausalLM, hooks: dict[int, Any]) -> Iterator[None]:
    """Forward hooks on blocks, removed on exit."""
    blocks = decoder.hf_blocks()
    handles = [blocks[index].register_forward_hook(hook) for index, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _skipped(decoder: CausalLM, upto: int, output: torch.Tensor) -> Iterator[None]:
    """Blocks 0..upto compute nothing: the lower ones pass their input on, block `upto`
    returns `output` (its forward hooks still run)."""
    blocks = decoder.hf_blocks()
    saved = [block.__dict__.get("forward") for block in blocks[: upto + 1]]

    def identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def replaced(*args: Any, **kwargs: Any) -> torch.Tensor:
        return output

    for index in range(upto + 1):
        blocks[index].forward = replaced if index == upto else identity
    try:
        yield
    finally:
        for block, forward in zip(blocks[: upto + 1], saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _adder(added: torch.Tensor, weights: torch.Tensor) -> Any:
    """A forward hook adding `weights` `[R, T, 1]` x `added` `[R, 1, d]` to a block's output."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = block_hidden(output)
        steered = hidden + weights * added
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def _cache(decoder: CausalLM, kvs: list[KV], rows: int) -> DynamicCache:
    """A fresh cache holding each of `kvs` (one per configuration) for `rows` rows, stacked in
    that order along the batch."""
    cache = DynamicCache(config=decoder.hf_model.config)
    for index in range(decoder.num_layers):
        keys = torch.cat([kv[index][0].expand(rows, -1, -1, -1) for kv in kvs])
        values = torch.cat([kv[index][1].expand(rows, -1, -1, -1) for kv in kvs])
        cache.update(keys, values, index)
    return cache


def _prefix_kv(
    decoder: CausalLM, prefix: tuple[int, ...], branch: Branch, weights: torch.Tensor
) -> KV:
    """Keys and values of every block over `prefix` under `branch` (token weights `[1, p, 1]`)."""
    ids = torch.tensor([prefix], device=decoder.device)
    hooks = {
        layer: _adder(added.view(1, 1, -1), weights) for layer, added in branch.additions.items()
    }
    with _hooks(decoder, hooks):
        output = decoder.hf_model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1
        )
    return [(layer.keys, layer.values) for layer in output.cache.layers]


def _prefix_states(
    decoder: CausalLM,
    prefix: tuple[int, ...],
    branches: list[Branch],
    prefix_weights: dict[str, torch.Tensor],
    store: PrefixStore,
) -> tuple[KV, list[KV]]:
    """The unsteered prefix's keys / values and each branch's, from `store` or forwarded."""
    unsteered = Branch({}, "all", decoder.num_layers - 1, ())
    base_key = (prefix, ())
    if base_key not in store.states:
        ones = torch.ones(1, len(prefix), 1, device=decoder.device)
        store.states[base_key] = _prefix_kv(decoder, prefix, unsteered, ones)
    base = store.states[base_key]
    kvs = []
    for branch in branches:
        weights = prefix_weights[branch.positions]
        if not branch.additions or not bool(weights.any()):
            kvs.append(base)
            continue
        key = (prefix, branch.fingerprint)
        if key not in store.states:
            steered = _prefix_kv(decoder, prefix, branch, weights)
            # Blocks up to the branch compute what the unsteered prefix did: keep one copy.
            store.states[key] = base[: branch.branch + 1] + steered[branch.branch + 1 :]
        kvs.append(store.states[key])
    return base, kvs


def _trunk(
    decoder: CausalLM,
    inputs: dict[str, torch.Tensor],
    base: KV | None,
    layers: list[int],
) -> dict[int, torch.Tensor]:
    """Unsteered outputs `[R, T, d]` of `layers`, from one forward stopped after the deepest."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[index] = block_hidden(output)
            if index == deepest:
                raise _Stop

        return hook

    rows = inputs["input_ids"].shape[0]
    cache = None if base is None else _cache(decoder, [base], rows)
    with _hooks(decoder, {layer: capture(layer) for layer in layers}), suppress(_Stop):
        decoder.hf_model(**inputs, cache=cache, use_cache=cache is not None, logits_to_keep=1)
    return captured


def _per_row(added: torch.Tensor, rows: int) -> torch.Tensor:
    """An addition as `[rows, 1, d]`: a conditioned one already has a row per row."""
    return added if added.ndim == 3 else added.view(1, 1, -1).expand(rows, 1, -1)


def _branches(
    decoder: CausalLM,
    inputs: dict[str, torch.Tensor],
    trunk: torch.Tensor,
    group: list[Branch],
    weights: list[torch.Tensor],
    kvs: list[KV] | None,
    keep: int,
) -> torch.Tensor:
    """Log-probabilities `[len(group) * R, keep, V]` of the configurations in `group` (all
    branching at one block), stacked along the batch from the `trunk` output `[R, T, d]`."""
    rows, count = trunk.shape[0], len(group)
    stacked = {name: value.repeat(count, 1) for name, value in inputs.items()}
    token_weights = torch.cat(weights).unsqueeze(-1)
    hooks = {}
    for layer in sorted({layer for branch in group for layer in branch.additions}):
        added = torch.cat(
            [
                _per_row(branch.additions.get(layer, torch.zeros_like(trunk[0, 0])), rows)
                for branch in group
            ]
        )
        hooks[layer] = _adder(added, token_weights)
    cache = None if kvs is None else _cache(decoder, kvs, rows)
    start = trunk.repeat(count, 1, 1)
    with _skipped(decoder, group[0].branch, start), _hooks(decoder, hooks):
        output = decoder.hf_model(
            **stacked, cache=cache, use_cache=cache is not None, logits_to_keep=keep
        )
    return torch.log_softmax(output.logits[:, -keep:].float(), dim=-1)


def _suffix_inputs(
    rows: list[list[int]], prefix_length: int, pad_id: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-padded tokens after the prefix, the mask over prefix + them, position ids counted
    from each row's first token; and the mask over whole rows `[R, p + T]`."""
    suffixes = [row[prefix_length:] for row in rows]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, suffix in enumerate(suffixes):
        ids[r, width - len(suffix) :] = torch.tensor(suffix)
        mask[r, width - len(suffix) :] = 1
    full = torch.cat([torch.ones(len(rows), prefix_length, dtype=torch.long), mask], dim=1)
    positions = prefix_length + (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": full, "position_ids": positions}
    return {name: value.to(device) for name, value in inputs.items()}, full.to(device)


@torch.inference_mode()
def grid_log_probs(
    decoder: CausalLM,
    rows: list[list[int]],
    prompt_lengths: list[int],
    interventions: list[Intervention | None],
    keep: int,
    store: PrefixStore | None = None,
    config_batch: int = 1,
) -> list[torch.Tensor]:
    """Next-token log-probabilities (float32) `[R, keep, V]` at the last `keep` tokens of each
    row, one tensor per intervention, as `steering.steered_logits` gives them for the
    left-padded batch of these rows.

    `rows` are token ids (no padding), `prompt_lengths[r]` the tokens of row r that are prompt
    (steering positions use it). `store` shares prefix keys / values across calls (None: no
    prefix sharing); `config_batch` configurations are stacked in one forward.
    """
    if not rows or not interventions:
        raise ValueError("grid_log_probs needs at least one row and one intervention")
    if len(prompt_lengths) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(prompt_lengths)} prompt lengths")
    if min(prompt_lengths) < 1 or any(
        p > len(r) for p, r in zip(prompt_lengths, rows, strict=True)
    ):
        raise ValueError("every row needs a prompt of at least one token, within the row")
    if keep < 1 or config_batch < 1:
        raise ValueError(f"keep and config_batch must be >= 1, got {keep}, {config_batch}")
    branches = [branch_of(decoder, intervention) for intervention in interventions]
    # A conditioned configuration steers each row's copy of the prefix differently.
    per_row = any(added.ndim == 3 for branch in branches for added in branch.additions.values())
    shared = store is not None and not per_row
    prefix = store.choose_prefix(rows, min(prompt_lengths) - 1) if shared else ()
    inputs, full_mask = _suffix_inputs(
        rows, len(prefix), decoder.tokenizer.pad_token_id, decoder.device
    )
    dtype = next(decoder.hf_model.parameters()).dtype
    lengths = torch.tensor(prompt_lengths, device=decoder.device)
    masks = {
        mode: position_mask(full_mask, lengths, mode).to(dtype)
        for mode in {branch.positions for branch in branches}
    }
    base, kvs = None, None
    if prefix:
        prefix_weights = {mode: mask[:1, : len(prefix), None] for mode, mask in masks.items()}
        base, kvs = _prefix_states(decoder, prefix, branches, prefix_weights, store)
    trunk = _trunk(decoder, inputs, base, sorted({branch.branch for branch in branches}))
    results: list[torch.Tensor | None] = [None] * len(branches)
    order = sorted(range(len(branches)), key=lambda n: branches[n].branch)
    for start in range(0, len(order), config_batch):
        chunk = order[start : start + config_batch]
        # One forward per chunk of configurations that branch at the same block.
        for layer in sorted({branches[n].branch for n in chunk}):
            group = [n for n in chunk if branches[n].branch == layer]
            log_probs = _branches(
                decoder,
                inputs,
                trunk[layer],
                [branches[n] for n in group],
                [masks[branches[n].positions][:, len(prefix) :] for n in group],
                None if kvs is None else [kvs[n] for n in group],
                keep,
            )
            for n, part in zip(group, log_probs.split(len(rows)), strict=True):
                results[n] = part
    return results
