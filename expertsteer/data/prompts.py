"""Prompt text for examples, answer texts, and labelled steering items.

Steering items for the RFM: prompt + correct answer (label 1) vs the same prompt + a wrong
answer (label 0) — a wrong option for choice tasks, a perturbed number for numeric ones; for a
concept set, the positive (1) and negative (0) texts themselves. Class items (conditioned
steering): the bare prompt labelled with its own gold class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from expertsteer.data.tasks import LETTERS, Example, Task


@dataclass(frozen=True)
class Item:
    """One text to capture: a prompt, an optional completion, and a label."""

    id: str
    """Unique id (the example id, plus `+`/`-` for correct / wrong completions)."""
    prompt: str
    """User-turn text (formatted with the model's chat template at capture time)."""
    completion: str
    """Assistant text appended after the formatted prompt; empty for prompt-only items."""
    label: int
    """1 for a correct answer / positive text, 0 otherwise; -1 when unlabelled."""


def render_prompt(task_type: str, example: Example) -> str:
    """The user-turn text of an example: passage, instruction, question, options, answer format."""
    if task_type in ("concept", "behaviour"):
        return example.question
    parts = [example.context] if example.context else []
    question = (
        f"{example.instruction}\n{example.question}" if example.instruction else example.question
    )
    if task_type == "choice":
        options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(example.choices))
        parts.append(f"{question}\n{options}\nAnswer with the letter of the correct option.")
    elif task_type in ("yesno", "classification"):
        parts.append(f"{question}\nAnswer with one of: {', '.join(example.choices)}.")
    else:
        parts.append(f"{question}\nGive the final answer as a number.")
    return "\n\n".join(parts)


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def answer_text(task_type: str, example: Example, answer: float | int) -> str:
    """Completion text stating `answer` (an option index, or a number for numeric tasks)."""
    if task_type == "choice":
        return f"{LETTERS[int(answer)]}. {example.choices[int(answer)]}"
    if task_type in ("yesno", "classification"):
        return example.choices[int(answer)]
    return f"The answer is {format_number(answer)}."


def wrong_answer(task_type: str, example: Example, rng: random.Random) -> float | int:
    """A deterministic (given `rng`) wrong answer for `example`."""
    if task_type == "numeric":
        gold = float(example.answer)
        scale = max(3, int(abs(gold) * 0.2))
        delta = rng.choice([d for d in range(-scale, scale + 1) if d != 0])
        if gold + delta < 0 <= gold:
            delta = abs(delta)
        return gold + delta
    wrong = [i for i in range(len(example.choices)) if i != example.answer]
    if not wrong:
        raise ValueError(f"example {example.id} has a single option; no wrong answer exists")
    return rng.choice(wrong)


def steering_items(task: Task, examples: list[Example], seed: int = 0) -> list[Item]:
    """Labelled items for fitting steering vectors from `examples` of `task`."""
    if task.type in ("concept", "behaviour"):
        # A behaviour task's dev split also holds its (unlabelled) prompts: not fitting data.
        return [Item(e.id, e.question, "", int(e.answer)) for e in examples if e.answer is not None]
    rng = random.Random(seed)
    items = []
    for example in examples:
        prompt = render_prompt(task.type, example)
        wrong = wrong_answer(task.type, example, rng)
        items.append(
            Item(f"{example.id}+", prompt, answer_text(task.type, example, example.answer), 1)
        )
        items.append(Item(f"{example.id}-", prompt, answer_text(task.type, example, wrong), 0))
    return items


def prompt_items(task: Task, examples: list[Example]) -> list[Item]:
    """Unlabelled prompt-only items (e.g. for layer pairing on prompts)."""
    return [Item(e.id, render_prompt(task.type, e), "", -1) for e in examples]


CLASS_TASK_TYPES = ("yesno", "classification")
"""Task types whose items have classes of their own (the concept of conditioned steering)."""


def class_items(task: Task, examples: list[Example]) -> list[Item]:
    """Prompt-only items labelled with their own gold class (option index): the concept of
    input-dependent steering (`expertsteer.method.conditioned`), yes/no and classification
    tasks only."""
    if task.type not in CLASS_TASK_TYPES:
        raise ValueError(
            f"task '{task.name}' is a {task.type} task; class items (conditioned steering) need "
            f"one of {CLASS_TASK_TYPES}"
        )
    return [Item(e.id, render_prompt(task.type, e), "", int(e.answer)) for e in examples]
