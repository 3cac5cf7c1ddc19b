"""Uniform access to the decoder blocks of a causal LM, through nnsight 0.8.

`CausalLM` wraps a loaded transformers model in `nnsight.modeling.transformers.TransformersModel`
and knows, per architecture family, where the list of decoder blocks lives. It also owns prompt
formatting (chat template when the model has one) and left-padded batch encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from expertsteer.errors import UnsupportedArchitectureError

# Attribute path, from the CausalLM module, of the ModuleList of decoder blocks.
LAYER_PATHS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "phi",
            "phi3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "starcoder2",
            "cohere",
        ),
        "model.layers",
    ),
    "gemma3": "model.language_model.layers",
    "gpt2": "transformer.h",
    "gpt_neo": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def layer_path(model: torch.nn.Module) -> str:
    """Where the decoder blocks of `model` live; raises for an unknown architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYER_PATHS:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' ({type(model).__name__}) has no known decoder-block "
            f"layout; supported: {', '.join(sorted(LAYER_PATHS))}. Add its attribute path to "
            "expertsteer.models.causal_lm.LAYER_PATHS."
        )
    return LAYER_PATHS[model_type]


def _resolve(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def block_hidden(output: Any) -> torch.Tensor:
    """The residual stream `[B, T, d]` from a block's output (a tensor in transformers 5).

    Older layouts return a tuple whose first item is the hidden states; indexing a plain tensor
    with `[0]` would silently take batch row 0 instead, so the type is checked.
    """
    return output[0] if isinstance(output, tuple) else output


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting each left-padded row from its first real token.

    nnsight supplies these in its traces; a plain transformers forward over a left-padded batch
    needs them passed explicitly (absolute-position models such as gpt2 depend on them).
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a wrapped model."""

    model_type: str
    """transformers `model_type`."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder blocks."""


class CausalLM:
    """A causal LM wrapped by nnsight with uniform block access and prompt formatting."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        chat_template: bool | None = None,
        name: str | None = None,
    ) -> None:
        from nnsight.modeling.transformers import TransformersModel

        self.path = layer_path(model)
        self.name = name or getattr(model, "name_or_path", type(model).__name__)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template and not has_template:
            raise ValueError(
                f"chat_template=True but the tokenizer of '{self.name}' has no chat template; "
                "set chat_template to false or null"
            )
        self.use_chat_template = has_template if chat_template is None else chat_template
        self.hf_model = model.eval()
        # Wrapping sets left padding and pad = eos on this tokenizer object (in place).
        self.lm = TransformersModel(model, tokenizer=tokenizer)
        self.tokenizer = self.lm.tokenizer
        if self.tokenizer.pad_token is None:
            raise ValueError(f"tokenizer of '{self.name}' has neither a pad nor an eos token")
        self.tokenizer.padding_side = "left"
        config = model.config
        self.info = ModelInfo(
            model_type=config.model_type,
            hidden_size=int(getattr(config, "hidden_size", None) or config.n_embd),
            num_layers=len(_resolve(model, self.path)),
        )

    @classmethod
    def from_loaded(cls, loaded: Any, chat_template: bool | None = None) -> CausalLM:
        """Wrap a `expertsteer.models.zoo.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, chat_template, name=loaded.model_id)

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def blocks(self) -> Any:
        """The nnsight envoy of the decoder-block list (index it inside a trace)."""
        return _resolve(self.lm, self.path)

    def hf_blocks(self) -> torch.nn.ModuleList:
        """The plain torch decoder-block list (for hooks outside nnsight)."""
        return _resolve(self.hf_model, self.path)

    def check_layers(self, layers: list[int] | None) -> list[int]:
        """Validate layer indices (negative allowed); return them sorted, unique, non-negative."""
        if layers is None:
            return list(range(self.num_layers))
        resolved = set()
        for layer in layers:
            if not -self.num_layers <= layer < self.num_layers:
                raise ValueError(
                    f"layer {layer} does not exist in '{self.name}', which has "
                    f"{self.num_layers} decoder blocks (valid: 0..{self.num_layers - 1})"
                )
            resolved.add(layer % self.num_layers)
        if not resolved:
            raise ValueError(f"empty layer list for '{self.name}'")
        return sorted(resolved)

    def format(self, prompts: list[str], completions: list[str] | None = None) -> list[str]:
        """Texts to tokenize: each prompt as one user turn (chat template, with the generation
        prompt) when in use, followed by its completion, if given, as the assistant's text."""
        if completions is not None and len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.use_chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for prompt in prompts
            ]
            joiner = ""
        else:
            texts, joiner = list(prompts), "\n"
        if completions is None:
            return texts
        return [
            text + joiner + done if done else text
            for text, done in zip(texts, completions, strict=True)
        ]

    def encode(
        self, prompts: list[str], completions: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Format and tokenize `prompts` (+ completions) into a left-padded batch."""
        if not prompts:
            raise ValueError("no prompts to encode")
        # A chat template writes its own special tokens; plain text gets the tokenizer's BOS.
        encoding = self.tokenizer(
            self.format(prompts, completions),
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.use_chat_template,
        )
        return {
            "input_ids": encoding["input_ids"].to(self.device),
            "attention_mask": encoding["attention_mask"].to(self.device),
        }

    def token_lengths(self, prompts: list[str], completions: list[str] | None = None) -> list[int]:
        """Unpadded token count of each text `encode` would make (for token-budget batches)."""
        encoding = self.tokenizer(
            self.format(prompts, completions), add_special_tokens=not self.use_chat_template
        )
        return [len(ids) for ids in encoding["input_ids"]]

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Greedy (unless `kwargs` say otherwise) completions of `prompts`, decoded."""
        encoding = self.encode(prompts)
        kwargs.setdefault("do_sample", False)
        with self.lm.generate(encoding, max_new_tokens=max_new_tokens, **kwargs) as tracer:
            ids = tracer.result.save()
        new = ids[:, encoding["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
