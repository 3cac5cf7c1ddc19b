import re
from pathlib import Path

import pytest
import yaml

from expertsteer.data.catalogue import BUILTIN, resolve_task
from expertsteer.data.generated import arithmetic_problems, sentiment_concept
from expertsteer.data.prompts import render_prompt, steering_items
from expertsteer.data.splits import SplitSizes, make_splits
from expertsteer.data.tasks import TaskError, TaskSpec, load_task, parse_number

DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"

# Pool sizes after dropping unusable rows (see each SOURCE.md and expertsteer.data.catalogue).
EXPECTED_POOLS = {
    "arithmetic": {"all": 1000},
    "sentiment_concept": {"all": 1000},
    "aqua_rat": {"test": 254, "train": 254},
    "arc_easy": {"test": 2376, "train": 2251},
    "arc_challenge": {"test": 1172, "train": 1119},
    "openbookqa": {"test": 500, "train": 4957},
    "winogrande": {"test": 1267},
    "boolq": {"test": 3270, "train": 9427},
    "commonsenseqa": {"test": 1221, "train": 9741},
    "medmcqa": {"test": 2815},
    "mmlu": {"test": 14042, "train": 285},
    "mmlu_medical": {"test": 1089, "train": 30},
    "piqa": {"test": 1838},
    "pubmedqa": {"test": 500, "train": 500},
    "financial_phrasebank": {"test": 1212, "train": 4846},
    "fiqa_sa": {"test": 235, "train": 1100},
    "headline_price_up": {"test": 10570},
    "sst2": {"test": 1821, "train": 6920, "dev": 872},
    "gsm8k": {"test": 1319, "train": 7473},
    "asdiv": {"test": 2084},
    "mawps": {"test": 2065},
    "multiarith": {"test": 600},
    "sentiment_steer": {"concept": 6920, "prompts": 1490},
    # Functions of the standard library on Python 3.11 (the set follows the Python version).
    "code_steer": {"concept": 1702, "prompts": 1489},
}

needs_shared = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"{DATA_ROOT} is absent")


def test_every_builtin_task_has_expected_sizes():
    assert set(EXPECTED_POOLS) == set(BUILTIN)


@needs_shared
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_task_loads_and_formats(name):
    task = load_task(BUILTIN[name], DATA_ROOT)
    assert {pool: len(rows) for pool, rows in task.pools.items()} == EXPECTED_POOLS[name]
    for example in task.all_examples()[:200]:
        prompt = render_prompt(task.type, example)
        assert example.question in prompt
        if task.type in ("choice", "yesno", "classification"):
            assert len(example.choices) >= 2
            assert 0 <= example.answer < len(example.choices)
            assert all(choice in prompt for choice in example.choices)
        elif task.type == "numeric":
            assert example.answer == float(example.answer)
        else:
            assert example.answer in (0, 1)


@needs_shared
def test_known_rows_parse_exactly():
    gsm = load_task(BUILTIN["gsm8k"], DATA_ROOT).pools["train"][0]
    assert gsm.question.startswith("Natalia sold clips") and gsm.answer == 72
    arc = load_task(BUILTIN["arc_easy"], DATA_ROOT).pools["test"][0]
    assert arc.choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.answer == 0
    wino = load_task(BUILTIN["winogrande"], DATA_ROOT).pools["test"][0]
    assert wino.choices == ("Sarah", "Maria") and wino.answer == 1


def test_parse_number_handles_gold_formats():
    assert parse_number("#### 114,200") == 114200
    assert parse_number("3.5 cm") == 3.5
    assert parse_number(-2) == -2.0
    with pytest.raises(ValueError):
        parse_number("Mrs. Hilt")


def test_generated_sets_are_reproducible_from_the_seed():
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)
    assert arithmetic_problems(50, seed=3) != arithmetic_problems(50, seed=4)
    assert sentiment_concept(20, seed=1) == sentiment_concept(20, seed=1)
    problems = arithmetic_problems(300, seed=0)
    assert all(p["answer"] >= 0 and float(p["answer"]).is_integer() for p in problems)
    labels = [row["label"] for row in sentiment_concept(100)]
    assert labels.count(0) == labels.count(1) == 50


def test_generated_arithmetic_answers_are_correct():
    for row in arithmetic_problems(200, seed=7):
        q = row["question"]
        numbers = [int(n) for n in re.findall(r"\d+", q)]
        if "gives" in q and "more" in q and "buys" not in q:
            assert row["answer"] == numbers[0] + numbers[1]
        elif q.count("boxes"):
            assert row["answer"] == numbers[0] * numbers[1]


def _write_user_task(tmp_path, rows, **overrides):
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    settings = {
        "name": "my_qa",
        "type": "choice",
        "files": {"test": "qa.jsonl"},
        "fields": {"question": "q", "choices": "opts", "answer": "gold", "id": "uid"},
        "answer_format": "letter",
        **overrides,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_user_yaml_task_needs_no_code(tmp_path):
    rows = [
        {"uid": f"u{i}", "q": f"Question {i}?", "opts": ["x", "y", "z"], "gold": "ABC"[i % 3]}
        for i in range(30)
    ]
    task = load_task(resolve_task(str(_write_user_task(tmp_path, rows))))
    assert task.name == "my_qa" and len(task.pools["test"]) == 30
    assert task.pools["test"][4].answer == 1 and task.pools["test"][4].id == "test/u4"
    splits = make_splits(task, SplitSizes(10, 5, 10), seed=0)
    assert {len(v) for v in splits.values()} == {10, 5}


def test_user_task_errors_name_the_problem(tmp_path):
    rows = [{"uid": "a", "q": "Q?", "opts": ["x", "y"], "gold": "A"}]
    with pytest.raises(TaskError, match="unknown key"):
        resolve_task(str(_write_user_task(tmp_path, rows, colour="red")))
    with pytest.raises(TaskError, match=r"qa.jsonl, data row 1: field 'missing' is missing"):
        load_task(
            resolve_task(str(_write_user_task(tmp_path, rows, fields={"question": "missing"})))
        )
    with pytest.raises(TaskError, match="does not exist"):
        load_task(TaskSpec(name="t", type="numeric", files={"test": "nope.jsonl"}), tmp_path)
    with pytest.raises(TaskError, match="type must be one of"):
        TaskSpec(name="t", type="essay", files={"test": "x"})
    with pytest.raises(TaskError, match="unknown task"):
        resolve_task("no_such_task")
    unreadable = tmp_path / "bad.jsonl"
    unreadable.write_text("{not json")
    with pytest.raises(TaskError, match="could not read"):
        load_task(TaskSpec(name="t", type="numeric", files={"test": str(unreadable)}))


def test_hub_task_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = TaskSpec(name="hubby", type="numeric", hub={"path": "openai/gsm8k", "name": "main"})
    with pytest.raises(TaskError, match="offline"):
        load_task(spec)


def test_splits_are_disjoint_deterministic_and_seeded():
    task = load_task(BUILTIN["arithmetic"])
    sizes = SplitSizes(steer=300, dev=100, test=200)
    splits = make_splits(task, sizes, seed=1)
    assert [len(splits[s]) for s in ("steer", "dev", "test")] == [300, 100, 200]
    ids = [{e.id for e in splits[s]} for s in ("steer", "dev", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    questions = [{e.question for e in splits[s]} for s in ("steer", "dev", "test")]
    assert not (questions[2] & (questions[0] | questions[1]))
    assert make_splits(task, sizes, seed=1) == splits
    assert make_splits(task, sizes, seed=2)["test"] != splits["test"]


def test_empty_split_is_refused():
    task = load_task(BUILTIN["arithmetic"])
    with pytest.raises(TaskError, match="split 'dev' is empty"):
        make_splits(task, SplitSizes(steer=900, dev=100, test=200))


def test_steering_items_pair_correct_and_wrong_answers():
    task = load_task(BUILTIN["arithmetic"])
    examples = task.pools["all"][:50]
    items = steering_items(task, examples, seed=0)
    assert len(items) == 100
    for correct, wrong in zip(items[::2], items[1::2], strict=True):
        assert (correct.label, wrong.label) == (1, 0)
        assert correct.prompt == wrong.prompt and correct.completion != wrong.completion
    assert steering_items(task, examples, seed=0) == items
    concept = load_task(BUILTIN["sentiment_concept"])
    concept_items = steering_items(concept, concept.pools["all"][:10])
    assert [item.label for item in concept_items] == [1, 0] * 5


def test_user_task_reads_parquet_and_csv(tmp_path):
    import datasets

    rows = [{"text": f"review {i}", "stars": ["neg", "pos"][i % 2]} for i in range(12)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "reviews.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "reviews.csv"), index=False)
    for name in ("reviews.parquet", "reviews.csv"):
        spec = TaskSpec(
            name="reviews",
            type="classification",
            labels=["negative", "positive"],
            label_values=["neg", "pos"],
            files={"all": str(tmp_path / name)},
            fields={"question": "text", "answer": "stars"},
        )
        task = load_task(spec)
        assert [e.answer for e in task.pools["all"]] == [0, 1] * 6
        assert task.pools["all"][3].choices == ("negative", "positive")


def _rows(count: int = 6) -> list[dict]:
    return [
        {"uid": f"u{i}", "q": f"Q{i}?", "opts": ["x", "y"], "gold": "AB"[i % 2]}
        for i in range(count)
    ]


def test_a_row_without_the_question_is_an_error_naming_file_row_and_field(tmp_path):
    rows = _rows()
    del rows[3]["q"]  # datasets fills the absent key with None: it used to become "None"
    with pytest.raises(TaskError, match=r"qa\.jsonl, data row 4: field 'q' is missing"):
        load_task(resolve_task(str(_write_user_task(tmp_path, rows))))


def test_rows_without_an_answer_fail_unless_dropping_is_asked_for_and_then_are_counted(
    tmp_path, caplog
):
    rows = _rows()
    rows[2]["gold"] = None
    rows[5]["gold"] = ""
    with pytest.raises(TaskError, match=r"data row 3: field 'gold' is missing.*skip_unanswered"):
        load_task(resolve_task(str(_write_user_task(tmp_path, rows))))
    path = _write_user_task(tmp_path, rows, skip_unanswered=True)
    with caplog.at_level("WARNING", logger="expertsteer.data.tasks"):
        task = load_task(resolve_task(str(path)))
    assert len(task.pools["test"]) == 4 and task.dropped == {"test": 2}
    assert "2 of 6 rows dropped" in caplog.text


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", ""])
def test_a_task_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    with pytest.raises(TaskError, match="names the run directory"):
        resolve_task(str(_write_user_task(tmp_path, _rows(), name=name)))


def test_unreadable_data_files_are_named_with_the_reason(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 cr\xe8me,0\n".encode("latin-1"))
    spec = dict(name="t", type="classification", labels=["a", "b"])
    spec["fields"] = {"question": "text", "answer": "label"}
    with pytest.raises(TaskError, match=r"empty\.csv is empty \(0 bytes\)"):
        load_task(TaskSpec(**spec, files={"test": str(empty)}))
    with pytest.raises(TaskError, match=r"latin\.csv is not UTF-8.*encoding"):
        load_task(TaskSpec(**spec, files={"test": str(latin)}))


def test_a_missing_file_of_a_task_yaml_points_at_the_yaml_folder_not_data_root(tmp_path):
    path = _write_user_task(tmp_path, _rows(), files={"test": "nope.jsonl"})
    with pytest.raises(TaskError, match="relative to the YAML's folder") as error:
        load_task(resolve_task(str(path)))
    assert "data_root" not in str(error.value)
