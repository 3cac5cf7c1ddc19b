"""Datasets written by the project, so the default experiment needs no external files.

* `arithmetic_problems`: grade-school word problems with one or two operations and a numeric
  gold answer, from templates filled by a seeded RNG.
* `sentiment_concept`: a concept-contrast set of positive (label 1) and negative (label 0)
  review sentences built from subject / verb / object pools, also seeded.

Both are pure functions of their arguments: the same seed gives the same rows.
"""

from __future__ import annotations

import random

NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "coins",
    "shells",
    "cards",
    "stamps",
)

# (template, answer function). Placeholders: n = name, m = other name, i = item, a/b/c numbers.
_ONE_STEP = (
    (
        "{n} has {a} {i}. {m} gives {n} {b} more {i}. How many {i} does {n} have now?",
        lambda a, b, c: a + b,
    ),
    (
        "{n} had {a} {i} and gave {b} of them to {m}. How many {i} does {n} have left?",
        lambda a, b, c: a - b,
    ),
    (
        "{n} buys {a} boxes of {i} with {b} {i} in each box. How many {i} does {n} buy?",
        lambda a, b, c: a * b,
    ),
)
_TWO_STEP = (
    (
        "{n} has {a} {i}. {n} buys {b} more and then gives {c} to {m}. How many {i} does {n} "
        "have now?",
        lambda a, b, c: a + b - c,
    ),
    (
        "{n} has {a} bags with {b} {i} in each bag and finds {c} more {i}. How many {i} does {n} "
        "have in total?",
        lambda a, b, c: a * b + c,
    ),
    (
        "{n} has {a} {i} and {m} has {b} times as many. How many {i} do they have together, "
        "if {m} then loses {c}?",
        lambda a, b, c: a + a * b - c,
    ),
)


def arithmetic_problems(count: int, seed: int = 0, two_step_fraction: float = 0.5) -> list[dict]:
    """`count` word problems `{id, question, answer}` with non-negative integer answers."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        templates = _TWO_STEP if rng.random() < two_step_fraction else _ONE_STEP
        template, solve = rng.choice(templates)
        n, m = rng.sample(NAMES, 2)
        a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 9)
        if "gave {b}" in template and b >= a:
            a, b = b + a, b
        answer = solve(a, b, c)
        if answer < 0:
            continue
        question = template.format(n=n, m=m, i=rng.choice(ITEMS), a=a, b=b, c=c)
        rows.append({"id": f"arith-{seed}-{len(rows)}", "question": question, "answer": answer})
    return rows


_SUBJECTS = (
    "The film",
    "This phone",
    "The restaurant",
    "Our hotel stay",
    "The new album",
    "This book",
    "The service",
    "The concert",
    "The laptop",
    "The game",
)
_POSITIVE = (
    ("was", "wonderful"),
    ("felt", "delightful"),
    ("was", "excellent"),
    ("turned out", "brilliant"),
    ("was", "a joy"),
    ("seemed", "superb"),
)
_NEGATIVE = (
    ("was", "awful"),
    ("felt", "miserable"),
    ("was", "terrible"),
    ("turned out", "a disaster"),
    ("was", "a waste of money"),
    ("seemed", "dreadful"),
)
_POSITIVE_TAILS = (
    "and I would gladly recommend it.",
    "and it made my day.",
    "and everyone loved it.",
    "and I can't wait to go back.",
)
_NEGATIVE_TAILS = (
    "and I would never recommend it.",
    "and it ruined my day.",
    "and everyone regretted it.",
    "and I want my money back.",
)


def sentiment_concept(count: int, seed: int = 0) -> list[dict]:
    """`count` review sentences `{id, text, label}`, alternating positive (1) and negative (0)."""
    if count < 2:
        raise ValueError(f"count must be >= 2 (one per class), got {count}")
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = 1 - index % 2
        verbs, tails = (_POSITIVE, _POSITIVE_TAILS) if label else (_NEGATIVE, _NEGATIVE_TAILS)
        verb, adjective = rng.choice(verbs)
        text = f"{rng.choice(_SUBJECTS)} {verb} {adjective}, {rng.choice(tails)}"
        rows.append({"id": f"sentiment-{seed}-{index}", "text": text, "label": label})
    return rows
