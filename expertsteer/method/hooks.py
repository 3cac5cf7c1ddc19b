"""Steering a plain transformers causal LM with forward hooks: no nnsight, no wrapper.

`steering_hooks(model, additions, positions)` is a context manager: while it is open, the
output of decoder block j gets `additions[j]` added at the steered tokens of every forward, the
model's own `generate` included (greedy, sampling, beam search, `num_return_sequences`: the
tokens are found per forward from that forward's own batch). On exit, also after an exception,
every hook is removed.

Which tokens, per forward (the same rules as `expertsteer.method.steer` under nnsight):

* a forward that starts a sequence (no cached keys / values yet) is the *prompt* pass: `all`
  and `prompt` steer its real tokens, `last_prompt` each row's last real token, `generated`
  nothing;
* a forward that continues a KV cache (a decode step of `generate`) forwards *generated*
  tokens: `all` and `generated` steer them, `prompt` and `last_prompt` nothing.

Real tokens are the ones the attention mask marks (pad tokens, left or right, are never
steered); without a mask every token is real. Without a KV cache (`use_cache=False`) every
forward looks like a prompt pass: `generated` then steers nothing and `prompt` everything.

The decoder blocks are found from the model itself (`find_blocks`): the known layout of its
family when there is one, else the one `ModuleList` whose length is the configured number of
hidden layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from expertsteer.errors import UnsupportedArchitectureError
from expertsteer.method.vectors import POSITIONS
from expertsteer.models.causal_lm import LAYER_PATHS, block_hidden

__all__ = ["find_blocks", "steering_hooks", "token_weights"]


def _num_layers(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The `ModuleList` of decoder blocks of a transformers causal LM.

    Known families use their attribute path (`expertsteer.models.causal_lm.LAYER_PATHS`);
    any other model is searched for the one `ModuleList` whose length is the configured
    number of hidden layers (the shallowest such list when several are)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LAYER_PATHS:
        found: Any = model
        try:
            for name in LAYER_PATHS[model_type].split("."):
                found = getattr(found, name)
            if isinstance(found, torch.nn.ModuleList):
                return found
        except AttributeError:
            pass
    count = _num_layers(model)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and count is not None and len(module) == count
    ]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of {type(model).__name__} (model_type "
            f"{model_type!r}): no ModuleList of config.num_hidden_layers={count} modules. "
            "Add its attribute path to expertsteer.models.causal_lm.LAYER_PATHS."
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _owner(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> torch.nn.Module:
    """The module whose child is the block list (the model itself when none is found)."""
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    return model


def token_weights(
    attention_mask: torch.Tensor | None,
    batch: int,
    length: int,
    continues_cache: bool,
    positions: str,
) -> torch.Tensor:
    """Bool [batch, length]: which tokens of one forward's `length` new columns are steered
    (module docstring). `attention_mask` [batch, >= length] covers cached + new columns."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got '{positions}'")
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] < length:
        real = torch.ones(batch, length, dtype=torch.bool)
    else:
        real = attention_mask[:, -length:].bool()
    if positions == "all":
        return real
    if continues_cache:
        return real if positions == "generated" else torch.zeros_like(real)
    if positions == "prompt":
        return real
    if positions == "generated":
        return torch.zeros_like(real)
    # last_prompt: each row's last real token (left or right padding alike).
    index = torch.arange(length, device=real.device).expand_as(real)
    last = torch.where(real, index, -1).amax(-1, keepdim=True)
    return real & (index == last)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, tuple | list) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


@contextmanager
def steering_hooks(
    model: torch.nn.Module, additions: Mapping[int, torch.Tensor], positions: str = "all"
) -> Iterator[None]:
    """Add `additions[j]` [d] to the output of decoder block j at the steered tokens of every
    forward of `model` inside the block; every hook is removed on exit."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got '{positions}'")
    blocks = find_blocks(model)
    for layer in additions:
        if not 0 <= layer < len(blocks):
            raise ValueError(
                f"layer {layer} does not exist: the model has {len(blocks)} decoder blocks"
            )
    state: dict[str, Any] = {"mask": None, "cached": 0}

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state["mask"] = kwargs.get("attention_mask")
        # transformers 5 passes the KV cache as `cache`; earlier versions `past_key_values`.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state["cached"] = _cache_length(cache)

    def adder(added: torch.Tensor) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = block_hidden(output)
            mask = state["mask"]
            # A forward continues a sequence when keys / values are cached, or when its mask
            # covers more columns than it forwards (the cached ones).
            continues = state["cached"] > 0 or (
                isinstance(mask, torch.Tensor)
                and mask.ndim == 2
                and mask.shape[1] > hidden.shape[1]
            )
            weights = token_weights(mask, hidden.shape[0], hidden.shape[1], continues, positions)
            weights = weights.to(hidden.device, hidden.dtype).unsqueeze(-1)
            steered = hidden + weights * added.to(hidden.device, hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    # On the module holding the blocks (e.g. LlamaModel): it sees the attention mask and the
    # cache whether the LM head's forward or the base model is called.
    handles = [_owner(model, blocks).register_forward_pre_hook(before_forward, with_kwargs=True)]
    try:
        for layer, added in sorted(additions.items()):
            handles.append(blocks[layer].register_forward_hook(adder(added)))
        yield
    finally:
        for handle in handles:
            handle.remove()
