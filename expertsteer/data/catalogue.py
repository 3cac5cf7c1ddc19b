"""Built-in tasks: every benchmark under `shared/data/benchmarks`, plus the generated sets.

File paths are relative to the data root (`expertsteer.data.tasks.resolve_data_root`: the explicit
`data_root`, else `$EXPERTSTEER_DATA`, else `../shared/data/benchmarks`). A task whose files
are absent there reads its hub dataset (`HUB_SPECS`, a spec in the hub's schema) when the hub
is reachable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from expertsteer.data import behaviour_sets  # noqa: F401 (registers the behaviour pool loaders)
from expertsteer.data.generated import arithmetic_problems, sentiment_concept
from expertsteer.data.tasks import (
    LETTERS,
    Example,
    TaskError,
    TaskSpec,
    _text,
    load_rows,
    load_task,
    local_paths,
    parse_number,
    pool_loader,
    resolve_paths,
    row_parser,
    spec_from_yaml,
)

MMLU_MEDICAL = (
    "clinical_knowledge",
    "medical_genetics",
    "anatomy",
    "college_medicine",
    "professional_medicine",
    "college_biology",
)

# -- row parsers ------------------------------------------------------------------------------

_LLM_ADAPTERS = re.compile(
    r"^Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\n"
    r"Answer format: answer\d(?:/answer\d)*$",
    re.S,
)


@row_parser("llm_adapters_choice")
def _llm_adapters_choice(row: dict, index: int, spec: TaskSpec) -> Example:
    match = _LLM_ADAPTERS.match(row["instruction"])
    if match is None:
        raise ValueError("instruction does not follow the 'Answer1: ...' layout")
    options = tuple(re.split(r" ?Answer\d: ", match.group(2))[1:])
    return Example(str(index), match.group(1).strip(), options, int(row["answer"][6:]) - 1)


WINOGRANDE_INSTRUCTION = "Fill in the blank:"
"""Kept apart from the sentence, so a content-free calibration prompt keeps it."""
_WINOGRANDE = re.compile(
    r"^Please choose the correct answer to fill in the blank to complete the given sentence: "
    r"(.*)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2$",
    re.S,
)


@row_parser("winogrande")
def _winogrande(row: dict, index: int, spec: TaskSpec) -> Example:
    match = _WINOGRANDE.match(row["instruction"])
    if match is None:
        raise ValueError("instruction does not follow the 'Option1: ... Option2:' layout")
    sentence, first, second = match.groups()
    return Example(
        str(index),
        sentence.strip(),
        (first, second),
        int(row["answer"][-1]) - 1,
        instruction=WINOGRANDE_INSTRUCTION,
    )


_BOOLQ = re.compile(
    r"^Please answer the following question with true or false, question: "
    r"(.*)\n\nAnswer format: true/false$",
    re.S,
)


@row_parser("boolq")
def _boolq(row: dict, index: int, spec: TaskSpec) -> Example:
    match = _BOOLQ.match(row["instruction"])
    if match is None:
        raise ValueError("instruction does not follow the BoolQ layout")
    question = match.group(1).strip()
    question = question[:1].upper() + question[1:]
    return Example(str(index), question, tuple(spec.labels), spec.labels.index(row["answer"]))


@row_parser("aqua_rat")
def _aqua_rat(row: dict, index: int, spec: TaskSpec) -> Example:
    options = tuple(
        re.match(r"^[A-E]\)\s*(.*)$", option, re.S).group(1).strip() for option in row["options"]
    )
    return Example(
        str(index), row["question"].strip(), options, LETTERS.index(row["correct"].strip())
    )


@row_parser("commonsenseqa")
def _commonsenseqa(row: dict, index: int, spec: TaskSpec) -> Example:
    choices = row["question"]["choices"]
    return Example(
        row["id"],
        row["question"]["stem"].strip(),
        tuple(choice["text"] for choice in choices),
        [choice["label"] for choice in choices].index(row["answerKey"]),
    )


@row_parser("medmcqa")
def _medmcqa(row: dict, index: int, spec: TaskSpec) -> Example | None:
    options = tuple(row["options"][key].strip() for key in "ABCD")
    if len(set(options)) == 1:
        return None  # all four options identical: unanswerable
    return Example(
        row["realidx"], row["question"].strip(), options, "ABCD".index(row["answer_idx"])
    )


_FINGPT = re.compile(r"^Instruction: .*?\nInput: (.*)\nAnswer: ?$", re.S)


@row_parser("sentiment_text")
def _sentiment_text(row: dict, index: int, spec: TaskSpec) -> Example:
    """FinGPT test rows (`context`, `target`) or already split rows (`text`, `label`)."""
    if "context" in row:
        text, label = _FINGPT.match(row["context"]).group(1).strip(), row["target"]
    else:
        text, label = row["text"].strip(), row["label"]
    return Example(
        str(index),
        text,
        tuple(spec.labels),
        spec.labels.index(label),
        instruction="What is the sentiment of this text?",
    )


@row_parser("gsm8k")
def _gsm8k(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(
        str(index), row["question"].strip(), answer=parse_number(row["answer"].split("####")[-1])
    )


@row_parser("asdiv")
def _asdiv(row: dict, index: int, spec: TaskSpec) -> Example | None:
    gold = re.sub(r"\s*\(.*?\)\s*", "", row["answer"]).strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", gold):
        return None  # names, ratios, clock times, yes/no: not a numeric answer
    question = f"{row['body'].strip()} {row['question'].strip()}"
    return Example(str(row["idx"]), question, answer=float(gold))


@row_parser("multiarith")
def _multiarith(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(str(row["iIndex"]), row["sQuestion"].strip(), answer=float(row["lSolutions"][0]))


@row_parser("mmlu")
def _mmlu(row: dict, index: int, spec: TaskSpec) -> Example:
    options = tuple(str(row[f"choice{i}"]) for i in range(4))
    return Example(
        f"{row['subject']}/{row['row']}", str(row["question"]).strip(), options, int(row["answer"])
    )


@row_parser("sst2")
def _sst2(row: dict, index: int, spec: TaskSpec) -> Example:
    label, text = row["text"].split(" ", 1)
    return Example(
        str(index),
        text.strip(),
        tuple(spec.labels),
        int(label),
        instruction="What is the sentiment of this movie review?",
    )


@row_parser("headline")
def _headline(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(
        str(index),
        row["News"].strip(),
        tuple(spec.labels),
        spec.labels.index("yes" if str(row["Price Direction Up"]) == "1" else "no"),
        instruction="Does this news headline talk about the price going up?",
    )


@row_parser("concept")
def _concept(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(row["id"], row["text"], answer=int(row["label"]))


@row_parser("generated_arithmetic")
def _generated_arithmetic(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(row["id"], row["question"], answer=float(row["answer"]))


# -- hub-schema row parsers (the same examples as the local files' parsers for the same rows) --


@row_parser("keyed_choice")
def _keyed_choice(row: dict, index: int, spec: TaskSpec) -> Example:
    """Hub rows with `choices: {text: [...], label: [...]}` and an `answerKey` among the labels."""
    choices = row["choices"]
    ident = str(row[spec.fields.id]) if spec.fields.id else str(index)
    return Example(
        ident,
        _text(row, spec.fields.question),
        tuple(str(text).strip() for text in choices["text"]),
        [str(label).strip() for label in choices["label"]].index(str(row["answerKey"]).strip()),
    )


@row_parser("boolq_hub")
def _boolq_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    question = _text(row, "question")
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return Example(str(index), question, tuple(spec.labels), int(bool(row["answer"])))


@row_parser("winogrande_hub")
def _winogrande_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    options = (_text(row, "option1"), _text(row, "option2"))
    return Example(
        str(index),
        _text(row, "sentence"),
        options,
        int(row["answer"]) - 1,
        instruction=WINOGRANDE_INSTRUCTION,
    )


@row_parser("mmlu_hub")
def _mmlu_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    options = tuple(str(choice) for choice in row["choices"])
    return Example(f"{row['subject']}/{index}", _text(row, "question"), options, int(row["answer"]))


@row_parser("pubmedqa_hub")
def _pubmedqa_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(
        str(row["pubid"]),
        _text(row, "question"),
        tuple(spec.labels),
        spec.labels.index(_text(row, "final_decision").lower()),
        context=" ".join(row["context"]["contexts"]).strip(),
    )


@row_parser("fiqa_hub")
def _fiqa_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(
        str(index),
        _text(row, "sentence"),
        tuple(spec.labels),
        spec.labels.index(_fiqa_label(float(row["score"]))),
        instruction="What is the sentiment of this text?",
    )


@row_parser("multiarith_hub")
def _multiarith_hub(row: dict, index: int, spec: TaskSpec) -> Example:
    return Example(str(index), _text(row, "question"), answer=float(row["final_ans"]))


@row_parser("medmcqa_hub")
def _medmcqa_hub(row: dict, index: int, spec: TaskSpec) -> Example | None:
    options = tuple(str(row[key]).strip() for key in ("opa", "opb", "opc", "opd"))
    if len(set(options)) == 1:
        return None  # all four options identical: unanswerable
    return Example(str(row["id"]), _text(row, "question"), options, int(row["cop"]))


# -- pool loaders -----------------------------------------------------------------------------


def _read_json(spec: TaskSpec, path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TaskError(f"task '{spec.name}': cannot read {path}: {error}") from error


@pool_loader("financial_phrasebank")
def _fpb_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    test_path, train_path = resolve_paths(
        spec, [spec.files["test"][0], spec.files["train"][0]], root
    )
    train = []
    for row in load_rows(spec, [train_path], "text", encoding="latin-1"):
        text, label = row["text"].rsplit("@", 1)
        train.append({"text": text, "label": label.strip()})
    return {"test": load_rows(spec, [test_path], "json"), "train": train}


def _fiqa_label(score: float) -> str:
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


@pool_loader("fiqa_sa")
def _fiqa_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    test_path, *train_paths = resolve_paths(spec, spec.files["test"] + spec.files["train"], root)
    train = []
    for path in train_paths:
        for record in _read_json(spec, path).values():
            labels = {_fiqa_label(float(info["sentiment_score"])) for info in record["info"]}
            if len(labels) == 1:  # sentences whose targets disagree have no single label
                train.append({"text": record["sentence"], "label": labels.pop()})
    return {"test": load_rows(spec, [test_path], "json"), "train": train}


@pool_loader("pubmedqa")
def _pubmedqa_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    data_path, truth_path = resolve_paths(spec, spec.files["data"] + spec.files["test_ids"], root)
    records, test_ids = _read_json(spec, data_path), _read_json(spec, truth_path)
    pools: dict[str, list[dict]] = {"test": [], "train": []}
    for pmid, record in records.items():
        pools["test" if pmid in test_ids else "train"].append(
            {
                "id": pmid,
                "question": record["QUESTION"],
                "context": " ".join(record["CONTEXTS"]),
                "answer": record["final_decision"],
            }
        )
    return pools


@pool_loader("piqa")
def _piqa_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    rows_path, labels_path = resolve_paths(spec, spec.files["test"] + spec.files["labels"], root)
    rows = load_rows(spec, [rows_path], "json")
    labels = labels_path.read_text().split()
    if len(labels) != len(rows):
        raise TaskError(f"task '{spec.name}': {len(rows)} rows but {len(labels)} labels")
    return {
        "test": [
            {
                "question": row["goal"],
                "sol1": row["sol1"],
                "sol2": row["sol2"],
                "answer": int(label),
            }
            for row, label in zip(rows, labels, strict=True)
        ]
    }


@pool_loader("mmlu")
def _mmlu_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    subjects = spec.loader_options.get("subjects")
    pools = {}
    for pool, (folder,) in spec.files.items():
        directory = root / folder
        if not directory.is_dir():
            raise TaskError(
                f"task '{spec.name}': folder {directory} does not exist (set "
                "data_root to the folder holding the benchmark files)"
            )
        files = sorted(directory.glob("*.csv"))
        if subjects:
            files = [f for f in files if f.stem.rsplit("_", 1)[0] in subjects]
        rows = []
        for path in files:
            # keep_default_na=False: some options are the literal text "None".
            for i, row in enumerate(load_rows(spec, [path], "csv", keep_default_na=False)):
                rows.append({**row, "subject": path.stem.rsplit("_", 1)[0], "row": i})
        pools[pool] = rows
    return pools


@pool_loader("generated_arithmetic")
def _arithmetic_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    return {
        "all": arithmetic_problems(
            spec.loader_options.get("count", 1000), spec.loader_options.get("seed", 0)
        )
    }


@pool_loader("sentiment_concept")
def _concept_pools(spec: TaskSpec, root: Path) -> dict[str, list[dict]]:
    return {
        "all": sentiment_concept(
            spec.loader_options.get("count", 1000), spec.loader_options.get("seed", 0)
        )
    }


def _llm_adapters(name: str, folder: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        type="choice",
        row_parser="llm_adapters_choice",
        files={"test": f"{folder}/test.json", "train": f"{folder}/train.json"},
    )


SENTIMENT3 = ["negative", "neutral", "positive"]
OPENING_FILES = ["gsm8k/test.jsonl", "pubmedqa/ori_pqal.json"]
"""Texts whose openings are the behaviour tasks' prompts (`behaviour_sets.neutral_openings`)."""
MMLU_FOLDERS = {"test": "mmlu/test", "train": "mmlu/dev"}

BEHAVIOUR_FIELDS = {"question": "text", "answer": "label", "id": "id"}

BUILTIN: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sentiment_steer",
            type="behaviour",
            pool_loader="sentiment_steer",
            fields=BEHAVIOUR_FIELDS,
            scorer="sentiment",
            instruction="Write in a positive tone.",
            files={"concept": "sst2/stsa.binary.train", "prompts": OPENING_FILES},
        ),
        TaskSpec(
            name="code_steer",
            type="behaviour",
            pool_loader="code_steer",
            fields=BEHAVIOUR_FIELDS,
            scorer="python_code",
            instruction="Answer in Python code.",
            files={
                "concept": ["gsm8k/train.jsonl", "arc/ARC-Easy/train.json"],
                "prompts": OPENING_FILES,
            },
        ),
        TaskSpec(
            name="arithmetic",
            type="numeric",
            pool_loader="generated_arithmetic",
            row_parser="generated_arithmetic",
        ),
        TaskSpec(
            name="sentiment_concept",
            type="concept",
            pool_loader="sentiment_concept",
            row_parser="concept",
        ),
        TaskSpec(
            name="aqua_rat",
            type="choice",
            row_parser="aqua_rat",
            format="json",
            files={"test": "aqua_rat/test.json", "train": "aqua_rat/dev.json"},
        ),
        _llm_adapters("arc_easy", "arc/ARC-Easy"),
        _llm_adapters("arc_challenge", "arc/ARC-Challenge"),
        _llm_adapters("openbookqa", "openbookqa"),
        TaskSpec(
            name="winogrande",
            type="choice",
            row_parser="winogrande",
            files={"test": "winogrande/test.json"},
        ),
        TaskSpec(
            name="boolq",
            type="yesno",
            row_parser="boolq",
            labels=["false", "true"],
            files={"test": "boolq/test.json", "train": "boolq/train.json"},
        ),
        TaskSpec(
            name="commonsenseqa",
            type="choice",
            row_parser="commonsenseqa",
            files={
                "test": "commonsenseqa/dev_rand_split.jsonl",
                "train": "commonsenseqa/train_rand_split.jsonl",
            },
        ),
        TaskSpec(
            name="medmcqa",
            type="choice",
            row_parser="medmcqa",
            files={"test": "medmcqa/test.jsonl"},
        ),
        TaskSpec(
            name="mmlu",
            type="choice",
            row_parser="mmlu",
            pool_loader="mmlu",
            files=MMLU_FOLDERS,
        ),
        TaskSpec(
            name="mmlu_medical",
            type="choice",
            row_parser="mmlu",
            pool_loader="mmlu",
            files=MMLU_FOLDERS,
            loader_options={"subjects": list(MMLU_MEDICAL)},
        ),
        TaskSpec(
            name="piqa",
            type="choice",
            pool_loader="piqa",
            fields={"question": "question", "choices": ["sol1", "sol2"], "answer": "answer"},
            files={"test": "piqa/valid.jsonl", "labels": "piqa/valid-labels.lst"},
        ),
        TaskSpec(
            name="pubmedqa",
            type="yesno",
            pool_loader="pubmedqa",
            answer_format="text",
            labels=["yes", "no", "maybe"],
            fields={"question": "question", "context": "context", "answer": "answer", "id": "id"},
            files={"data": "pubmedqa/ori_pqal.json", "test_ids": "pubmedqa/test_ground_truth.json"},
        ),
        TaskSpec(
            name="financial_phrasebank",
            type="classification",
            labels=SENTIMENT3,
            pool_loader="financial_phrasebank",
            row_parser="sentiment_text",
            files={
                "test": "financial_phrasebank/fingpt_split/fpb_test.jsonl",
                "train": "financial_phrasebank/FinancialPhraseBank-v1.0/Sentences_50Agree.txt",
            },
        ),
        TaskSpec(
            name="fiqa_sa",
            type="classification",
            labels=SENTIMENT3,
            pool_loader="fiqa_sa",
            row_parser="sentiment_text",
            files={
                "test": "fiqa_sa/fingpt_split/fiqa_test.jsonl",
                "train": [
                    "fiqa_sa/task1_headline_ABSA_train.json",
                    "fiqa_sa/task1_post_ABSA_train.json",
                ],
            },
        ),
        TaskSpec(
            name="headline_price_up",
            type="yesno",
            row_parser="headline",
            labels=["no", "yes"],
            format="csv",
            read_options={"delimiter": "\t"},
            files={"test": "headline_gold/gold-dataset-sinha-khandait.csv"},
        ),
        TaskSpec(
            name="sst2",
            type="classification",
            row_parser="sst2",
            format="text",
            labels=["negative", "positive"],
            files={
                "test": "sst2/stsa.binary.test",
                "train": "sst2/stsa.binary.train",
                "dev": "sst2/stsa.binary.dev",
            },
        ),
        TaskSpec(
            name="gsm8k",
            type="numeric",
            row_parser="gsm8k",
            files={"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
        ),
        TaskSpec(
            name="asdiv",
            type="numeric",
            row_parser="asdiv",
            files={"test": "asdiv/tora/test.jsonl"},
        ),
        TaskSpec(
            name="mawps",
            type="numeric",
            answer_format="number",
            fields={"question": "input", "answer": "target", "id": "idx"},
            files={"test": "mawps/test.jsonl"},
        ),
        TaskSpec(
            name="multiarith",
            type="numeric",
            row_parser="multiarith",
            format="json",
            files={"test": "multiarith/MultiArith.json"},
        ),
    )
}


def _hub(name: str, path: str, config: str | None, splits: dict[str, str], **spec) -> TaskSpec:
    """A built-in task read from a hub dataset (pool -> hub split), in the hub's schema."""
    hub = {"path": path, "name": config, "splits": splits}
    return TaskSpec(name=name, type=BUILTIN[name].type, hub=hub, **spec)


_CHOICE = {"row_parser": "keyed_choice"}
HUB_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _hub(
            "sst2",
            "SetFit/sst2",
            None,
            {"test": "test", "train": "train", "dev": "validation"},
            labels=["negative", "positive"],
            fields={"question": "text", "answer": "label"},
            instruction="What is the sentiment of this movie review?",
        ),
        _hub(
            "gsm8k", "openai/gsm8k", "main", {"test": "test", "train": "train"}, row_parser="gsm8k"
        ),
        _hub(
            "boolq",
            "google/boolq",
            None,
            {"test": "validation", "train": "train"},
            labels=["false", "true"],
            row_parser="boolq_hub",
        ),
        _hub(
            "arc_easy", "allenai/ai2_arc", "ARC-Easy", {"test": "test", "train": "train"}, **_CHOICE
        ),
        _hub(
            "arc_challenge",
            "allenai/ai2_arc",
            "ARC-Challenge",
            {"test": "test", "train": "train"},
            **_CHOICE,
        ),
        _hub(
            "openbookqa",
            "allenai/openbookqa",
            "main",
            {"test": "test", "train": "train"},
            fields={"question": "question_stem"},
            **_CHOICE,
        ),
        _hub(
            "commonsenseqa",
            "tau/commonsense_qa",
            None,
            {"test": "validation", "train": "train"},
            fields={"question": "question", "id": "id"},
            **_CHOICE,
        ),
        _hub(
            "aqua_rat",
            "deepmind/aqua_rat",
            "raw",
            {"test": "test", "train": "validation"},
            row_parser="aqua_rat",
        ),
        _hub(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            {"test": "validation"},
            row_parser="winogrande_hub",
        ),
        _hub("mmlu", "cais/mmlu", "all", {"test": "test", "train": "dev"}, row_parser="mmlu_hub"),
        _hub(
            "pubmedqa",
            "qiaojin/PubMedQA",
            "pqa_labeled",
            {"all": "train"},
            labels=["yes", "no", "maybe"],
            row_parser="pubmedqa_hub",
        ),
        _hub(
            "fiqa_sa",
            "TheFinAI/fiqa-sentiment-classification",
            None,
            {"test": "test", "train": "train"},
            labels=SENTIMENT3,
            row_parser="fiqa_hub",
        ),
        _hub(
            "multiarith",
            "ChilleD/MultiArith",
            None,
            {"test": "test", "train": "train"},
            row_parser="multiarith_hub",
        ),
        _hub(
            "medmcqa",
            "openlifescienceai/medmcqa",
            None,
            {"test": "validation"},
            row_parser="medmcqa_hub",
        ),
    )
}
"""Built-in task -> the same task from its hub dataset (read when the local files are absent).
Tasks not here (piqa, financial_phrasebank, headline_price_up, asdiv, mawps, mmlu_medical) have
no hub copy in a plain data format; they need their local files."""
for _name, _spec in HUB_SPECS.items():
    BUILTIN[_name].hub_fallback = _spec


@dataclass
class CatalogueEntry:
    """One built-in task as `expertsteer tasks` lists it."""

    name: str
    """Task name."""
    type: str
    """Task type."""
    pools: dict[str, int]
    """Pool -> examples, when the data is local (empty otherwise: not downloaded to count)."""
    source: str
    """Where the rows come from: generated, a local folder, or a hub dataset."""


def catalogue(data_root: str | Path) -> list[CatalogueEntry]:
    """Every built-in task with its pool sizes (local or generated data) and its source."""
    entries = []
    for name, spec in BUILTIN.items():
        paths = local_paths(spec, data_root)
        if all(path.exists() for path in paths):
            task = load_task(spec, data_root)
            pools = {pool: len(examples) for pool, examples in task.pools.items()}
            source = "generated" if not paths else f"local {os.path.commonpath(paths)}"
        else:
            pools = {}
            hub = spec.hub_fallback.hub if spec.hub_fallback else None
            source = f"hub {hub['path']}" if hub else "missing (no hub copy)"
        entries.append(CatalogueEntry(name, spec.type, pools, source))
    return entries


def resolve_task(task: str | TaskSpec) -> TaskSpec:
    """A built-in task by name, or a user task from a YAML path."""
    if isinstance(task, TaskSpec):
        return task
    if task in BUILTIN:
        return BUILTIN[task]
    if task.endswith((".yaml", ".yml")):
        return spec_from_yaml(task)
    raise TaskError(
        f"unknown task '{task}': not a built-in task ({', '.join(sorted(BUILTIN))})"
        " and not a .yaml task file"
    )
