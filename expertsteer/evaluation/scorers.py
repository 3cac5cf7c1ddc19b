"""Concept scorers of open-ended continuations: offline, deterministic, one small class each.

Every scorer has `score(texts) -> list[float]` (the concept score of each text, averaged into a
method's `concept`) and `hits(texts) -> list[bool]` (whether each text shows the concept,
averaged into its `share`):

* `sentiment`: VADER's compound polarity in [-1, 1] (the `vaderSentiment` lexicon ships in the
  wheel); a hit is compound > 0.05, VADER's own threshold for "positive".
* `python_code`: the fraction of a text's non-empty lines that look like Python code; a hit is
  a block of at least 2 consecutive lines that `ast.parse` accepts and that holds a def, an
  assignment or a call.
* `keywords`: 1.0 when any of the user's words (whole words, case-insensitive) or regular
  expressions occurs, else 0.0.
* `callable`: a user's `module:function` taking the list of texts and returning one float per
  text; a hit is a score > `threshold` (default 0.5). The path is imported when the scorer is
  built (the task is checked), so a bad one fails before any model loads.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from expertsteer.errors import ExpertSteerError

SENTIMENT_THRESHOLD = 0.05
"""VADER's conventional cut: compound > 0.05 is positive."""


class ScorerError(ExpertSteerError):
    """A scorer name or its options cannot be used."""


class Scorer:
    """Concept score per text; `hits` thresholds it at `threshold` unless a scorer says more."""

    name = ""
    threshold = 0.5

    def score(self, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def hits(self, texts: Sequence[str]) -> list[bool]:
        return [value > self.threshold for value in self.score(texts)]


class SentimentScorer(Scorer):
    """VADER compound polarity; a hit is a positive text (compound > 0.05)."""

    name = "sentiment"
    threshold = SENTIMENT_THRESHOLD

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as error:
            raise ScorerError(
                "the sentiment scorer needs the vaderSentiment package (pip install "
                "vaderSentiment==3.3.2)"
            ) from error
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(text)["compound"]) for text in texts]


_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \S+ import |return\b|if .*:\s*$|elif .*:\s*$|else:\s*$|"
    r"for .* in .*:\s*$|while .*:\s*$|try:\s*$|except\b.*:\s*$|with .*:\s*$|@\w|#|"
    r"[A-Za-z_][\w.\[\]]*\s*(?:[+\-*/%|&]?=)(?!=)|[A-Za-z_][\w.]*\(.*\)\s*$|print\()"
)


def code_like(line: str) -> bool:
    """Whether one line looks like Python: a keyword statement, an assignment, a call alone on
    its line, a decorator or a comment."""
    return bool(_CODE_LINE.match(line))


def _substantive(tree: ast.AST) -> bool:
    """Whether a parsed block holds a def, an assignment or a call."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign, ast.AugAssign, ast.AnnAssign)
    return any(isinstance(node, (*kinds, ast.Call)) for node in ast.walk(tree))


def holds_code_block(text: str, min_lines: int = 2) -> bool:
    """Whether `text` holds at least `min_lines` consecutive non-empty lines that parse as Python
    and contain a def, an assignment or a call (Markdown fences are ignored)."""
    lines = [line for line in text.replace("\t", "    ").splitlines() if not line.startswith("```")]
    for start in range(len(lines)):
        for stop in range(len(lines), start + min_lines - 1, -1):
            block = lines[start:stop]
            if sum(bool(line.strip()) for line in block) < min_lines:
                continue
            try:
                tree = ast.parse("\n".join(block))
            except (SyntaxError, ValueError):
                continue
            if _substantive(tree):
                return True
    return False


class PythonCodeScorer(Scorer):
    """Fraction of code-like lines; a hit is a parseable block of >= 2 lines (def / assignment
    / call)."""

    name = "python_code"

    def __init__(self, min_lines: int = 2) -> None:
        if isinstance(min_lines, bool) or not isinstance(min_lines, int) or min_lines < 1:
            raise ScorerError(f"python_code: min_lines must be an integer >= 1, got {min_lines!r}")
        self.min_lines = min_lines

    def score(self, texts: Sequence[str]) -> list[float]:
        scores = []
        for text in texts:
            lines = [line for line in text.splitlines() if line.strip()]
            scores.append(sum(map(code_like, lines)) / len(lines) if lines else 0.0)
        return scores

    def hits(self, texts: Sequence[str]) -> list[bool]:
        return [holds_code_block(text, self.min_lines) for text in texts]


class KeywordsScorer(Scorer):
    """1.0 when any word (whole word, case-insensitive) or regular expression occurs."""

    name = "keywords"

    def __init__(self, words: Sequence[str] = (), patterns: Sequence[str] = ()) -> None:
        if isinstance(words, str) or isinstance(patterns, str):
            raise ScorerError("keywords: words and patterns must be lists of strings")
        if not words and not patterns:
            raise ScorerError("keywords: give at least one of `words` or `patterns`")
        compiled = [rf"(?<!\w){re.escape(str(word))}(?!\w)" for word in words]
        for pattern in patterns:
            try:
                re.compile(str(pattern))
            except re.error as error:
                raise ScorerError(
                    f"keywords: bad regular expression {pattern!r}: {error}"
                ) from None
            compiled.append(f"(?:{pattern})")
        self.pattern = re.compile("|".join(compiled), re.IGNORECASE)

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(self.pattern.search(text) is not None) for text in texts]


class CallableScorer(Scorer):
    """A user's `module:function(texts) -> list[float]`."""

    name = "callable"

    def __init__(self, function: str = "", threshold: float = 0.5) -> None:
        self.path = function
        self.function = load_callable(function)
        self.threshold = float(threshold)

    def score(self, texts: Sequence[str]) -> list[float]:
        values = list(self.function(list(texts)))
        if len(values) != len(texts):
            raise ScorerError(
                f"callable scorer {self.path} returned {len(values)} scores for {len(texts)} texts"
            )
        return [float(value) for value in values]


def load_callable(path: str) -> Callable[[list[str]], Sequence[float]]:
    """The function a `module:function` path names; one clear error if it cannot be used."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ScorerError(
            f"callable scorer: function must be 'module:function' (e.g. "
            f"'my_scorers:positivity'), got {path!r}"
        )
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ScorerError(
            f"callable scorer {path}: cannot import module '{module_name}' ({error}); put it on "
            "PYTHONPATH or install it"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ScorerError(f"callable scorer {path}: '{module_name}' has no function '{attribute}'")
    return function


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (SentimentScorer, PythonCodeScorer, KeywordsScorer, CallableScorer)
}


def make_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    """The scorer `name` built with `options`; unknown names and options are named."""
    if name not in SCORERS:
        raise ScorerError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    options = dict(options or {})
    try:
        return SCORERS[name](**options)
    except TypeError as error:
        raise ScorerError(f"scorer {name!r}: bad options {sorted(options)} ({error})") from None
