"""The built-in behaviour tasks and a behaviour task's splits: concept texts fit, prompts are
continued; prompts are neutral openings of real text, disjoint from the concept texts."""

from pathlib import Path

import pytest

from expertsteer.data.behaviour_sets import neutral_openings, stdlib_functions
from expertsteer.data.catalogue import BUILTIN
from expertsteer.data.prompts import steering_items
from expertsteer.data.splits import SplitSizes, make_splits
from expertsteer.data.tasks import Example, Task, TaskError, load_task
from expertsteer.evaluation.scorers import make_scorer

DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
needs_shared = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"{DATA_ROOT} is absent")


def _task() -> Task:
    concept = [Example(f"c{i}", f"text {i}", answer=i % 2) for i in range(30)]
    prompts = [Example(f"p{i}", f"prompt {i}") for i in range(20)]
    return Task("t", "behaviour", {"concept": concept, "prompts": prompts})


def test_behaviour_splits_fit_on_concept_texts_and_continue_prompts():
    splits = make_splits(_task(), SplitSizes(steer=10, dev=4, test=8), seed=0)
    assert all(e.answer is not None for e in splits["steer"]) and len(splits["steer"]) == 10
    assert all(e.answer is None for e in splits["test"]) and len(splits["test"]) == 8
    dev_concept = [e for e in splits["dev"] if e.answer is not None]
    dev_prompts = [e for e in splits["dev"] if e.answer is None]
    assert len(dev_concept) == 4 and len(dev_prompts) == 4
    ids = [e.id for split in splits.values() for e in split]
    assert len(ids) == len(set(ids))
    # Fitting reads the labelled texts of dev only.
    assert [item.id for item in steering_items(_task(), splits["dev"])] == [
        e.id for e in dev_concept
    ]
    with pytest.raises(TaskError, match="pool 'prompts' has 20 rows, the split sizes need 24"):
        make_splits(_task(), SplitSizes(steer=10, dev=4, test=20), seed=0)


def test_openings_are_vader_neutral_and_interleaved():
    rows = neutral_openings(
        {
            "a": [
                "What a wonderful happy day it was for all of us",
                "The bus left the depot at nine sharp today",
            ],
            "b": ["Cells were counted under the microscope at fixed times each day"],
        }
    )
    assert [row["id"] for row in rows] == ["a/1", "b/0"]  # the first opening is positive
    assert all(len(row["text"].split()) in range(5, 9) for row in rows)


def test_code_texts_are_standard_library_functions():
    rows = stdlib_functions(limit=50)
    assert len(rows) == 50 and all(row["label"] == 1 for row in rows)
    assert all(row["text"].lstrip().startswith(("def ", "@", "async def ")) for row in rows)
    assert make_scorer("python_code").score([rows[0]["text"]])[0] > 0.5


@needs_shared
@pytest.mark.parametrize("name", ["sentiment_steer", "code_steer"])
def test_builtin_behaviour_prompts_are_neutral_and_apart_from_the_concept_texts(name):
    task = load_task(BUILTIN[name], DATA_ROOT)
    prompts = [e.question for e in task.pools["prompts"]]
    assert make_scorer("sentiment").score(prompts[:200]) == [0.0] * 200
    concept = {e.question for e in task.pools["concept"]}
    assert not any(prompt in text for prompt in prompts[:200] for text in concept)
    labels = [e.answer for e in task.pools["concept"]]
    assert set(labels) == {0, 1}
