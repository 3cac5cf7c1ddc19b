"""Pools of the built-in behaviour tasks, read from real text (`expertsteer.data.catalogue`).

* `sentiment_steer`: concept = SST-2 training sentences, positive (1) vs negative (0); prompts =
  openings of GSM8K test questions and PubMedQA abstracts (their first 5-8 words) that VADER
  scores exactly neutral.
* `code_steer`: concept = Python code (1), the first lines of the functions of the Python
  standard library, parsed from its source files (present on every machine; the set follows the
  Python version), vs prose (0), GSM8K and ARC-Easy training questions; prompts = the same
  neutral prose openings as `sentiment_steer`.

Pools are pure functions of the files (and the Python version, for code): rows are deterministic.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import textwrap
from pathlib import Path

from expertsteer.data.tasks import TaskSpec, load_rows, pool_loader, resolve_paths

OPENING_WORDS = (5, 8)
"""Inclusive range of words an opening keeps (drawn per text from a fixed seed)."""
CODE_LINES = 8
"""Lines of a standard-library function kept as one code text (its signature and first lines)."""
CODE_CHARS = 400
"""Longest code text, cut at a line end; prose texts are cut at a word end to the same length."""
STDLIB_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "email.utils",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "http.cookies",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "ntpath",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "plistlib",
    "posixpath",
    "pprint",
    "quopri",
    "random",
    "shlex",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "zipfile",
)
"""Pure-Python standard-library modules whose functions make the code texts."""


def _clip_words(text: str, limit: int = CODE_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def stdlib_functions(limit: int | None = None) -> list[dict]:
    """Code rows `{id, text, label: 1}`: the first `CODE_LINES` lines (at most `CODE_CHARS`
    characters) of every top-level function in the source files of `STDLIB_MODULES`, in file
    order. The source is parsed, not imported, so the set depends on the Python version only."""
    rows = []
    for module_name in STDLIB_MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        source = Path(spec.origin).read_text(encoding="utf-8")
        lines_of = source.splitlines()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            body = textwrap.dedent("\n".join(lines_of[first : node.end_lineno]))
            lines, size = [], 0
            for line in body.splitlines()[:CODE_LINES]:
                if size + len(line) + 1 > CODE_CHARS:
                    break
                lines.append(line)
                size += len(line) + 1
            if len(lines) >= 3:
                rows.append({"id": f"code/{module_name}.{node.name}", "text": "\n".join(lines)})
    return [{**row, "label": 1} for row in rows[:limit]]


def _sst2_sentences(path: Path) -> list[dict]:
    rows = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        label, text = line.split(" ", 1)
        rows.append({"id": f"sst2/{index}", "text": text.strip(), "label": int(label)})
    return rows


def _gsm8k_questions(spec: TaskSpec, path: Path) -> list[str]:
    return [row["question"].strip() for row in load_rows(spec, [path], "json")]


def _pubmedqa_contexts(path: Path) -> list[str]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [" ".join(records[key]["CONTEXTS"]).strip() for key in sorted(records)]


_ARC_QUESTION = re.compile(r"^Please choose the correct answer to the question: (.*?)\n\n", re.S)


def _arc_questions(path: Path) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    found = (_ARC_QUESTION.match(row["instruction"]) for row in rows)
    return [match.group(1).strip() for match in found if match]


def neutral_openings(sources: dict[str, list[str]], seed: int = 0) -> list[dict]:
    """Prompt rows `{id, text}`: the first 5-8 words of each text (the count drawn from `seed`),
    kept when VADER scores them exactly 0, the sources interleaved, duplicates dropped."""
    from expertsteer.evaluation.scorers import SentimentScorer

    rng = random.Random(seed)
    scorer = SentimentScorer()
    per_source = []
    for name, texts in sources.items():
        rows = []
        for index, text in enumerate(texts):
            words = text.split()
            count = rng.randint(*OPENING_WORDS)
            if len(words) <= count:
                continue
            opening = " ".join(words[:count]).rstrip(",;:")
            rows.append({"id": f"{name}/{index}", "text": opening})
        scores = scorer.score([row["text"] for row in rows])
        per_source.append([row for row, value in zip(rows, scores, strict=True) if value == 0.0])
    seen: set[str] = set()
    interleaved = []
    for group in zip(*per_source, strict=False):
        for row in group:
            if row["text"] not in seen:
                seen.add(row["text"])
                interleaved.append(row)
    return interleaved


def _prompt_pool(spec: TaskSpec, root: Path, concept: list[dict]) -> list[dict]:
    """Neutral openings of GSM8K test questions and PubMedQA abstracts, none of them inside a
    concept text (GSM8K's train and test questions share phrasings)."""
    gsm8k, pubmedqa = resolve_paths(spec, spec.files["prompts"], root)
    openings = neutral_openings(
        {"gsm8k_test": _gsm8k_questions(spec, gsm8k), "pubmedqa": _pubmedqa_contexts(pubmedqa)}
    )
    texts = "\n".join(row["text"] for row in concept)
    return [row for row in openings if row["text"] not in texts]


@pool_loader("sentiment_steer")
def _sentiment_steer_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    (sst2,) = resolve_paths(spec, spec.files["concept"], root)
    concept = _sst2_sentences(sst2)
    return {"concept": concept, "prompts": _prompt_pool(spec, root, concept)}


@pool_loader("code_steer")
def _code_steer_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    gsm8k, arc = resolve_paths(spec, spec.files["concept"], root)
    code = stdlib_functions()
    prose_texts = {"gsm8k_train": _gsm8k_questions(spec, gsm8k), "arc_easy": _arc_questions(arc)}
    per_source = [
        [
            {"id": f"{name}/{index}", "text": _clip_words(text), "label": 0}
            for index, text in enumerate(texts)
        ]
        for name, texts in prose_texts.items()
    ]
    prose = [row for group in zip(*per_source, strict=False) for row in group]
    concept = code + prose[: len(code)]
    return {"concept": concept, "prompts": _prompt_pool(spec, root, concept)}
