"""Splits a user can trust: duplicated rows never leak between splits, contradicting rows are
named, and a split the data cannot fill is said, not silently shrunk."""

import json
import logging
import random

import pytest
import yaml

from expertsteer.data.catalogue import resolve_task
from expertsteer.data.splits import SplitSizes, find_duplicates, make_splits, text_key
from expertsteer.data.tasks import TaskError, load_task
from tests.tiny_task import text_task


def _task_file(tmp_path, rows):
    """The review task over `rows`, in one pool `all` (shuffled and cut)."""
    path = text_task(tmp_path, rows)
    spec = yaml.safe_load(path.read_text())
    spec["files"] = {"all": spec["files"]["test"]}
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(count, repeat=0, contradict=0):
    rows = [{"text": f"Review {i}.", "y": ["bad", "good"][i % 2]} for i in range(count)]
    rows += [dict(rows[i]) for i in range(repeat)]  # the same text and label again
    rows += [{"text": rows[i]["text"], "y": ["good", "bad"][i % 2]} for i in range(contradict)]
    return rows


def test_repeated_rows_never_sit_in_two_splits_and_are_counted(tmp_path, caplog):
    task = load_task(resolve_task(str(_task_file(tmp_path, _rows(8, repeat=8)))))
    found = find_duplicates(task.all_examples())
    assert found.repeated == 8 and found.contradicting == []
    with caplog.at_level(logging.WARNING):
        splits = make_splits(task, SplitSizes(steer=4, dev=2, test=2), seed=0)
    texts = [{text_key(e) for e in splits[name]} for name in ("steer", "dev", "test")]
    assert sum(len(t) for t in texts) == len(set().union(*texts)) == 8  # no text twice
    assert [len(splits[name]) for name in ("steer", "dev", "test")] == [4, 2, 2]
    assert "8 repeated rows" in caplog.text


def test_contradicting_rows_are_left_out_and_named(tmp_path):
    task = load_task(resolve_task(str(_task_file(tmp_path, _rows(12, contradict=2)))))
    found = find_duplicates(task.all_examples())
    assert found.contradicting == ["Review 0.", "Review 1."] and found.contradicting_rows == 4
    splits = make_splits(task, SplitSizes(steer=6, dev=2, test=2), seed=0)
    used = {e.question for split in splits.values() for e in split}
    assert not used & {"Review 0.", "Review 1."}


def _splits_before_deduplication(task, sizes, seed):
    """The splitting rule as it was before deduplication (the reference)."""
    rng = random.Random(seed)
    if "test" in task.pools and len(task.pools) > 1:
        test_pool = list(task.pools["test"])
        fit_pool = [e for name, pool in task.pools.items() if name != "test" for e in pool]
    else:
        everything = task.all_examples()
        rng.shuffle(everything)
        test_pool, fit_pool = everything[: sizes.test], everything[sizes.test :]
    rng.shuffle(test_pool)
    test = test_pool[: sizes.test]
    seen = {(e.context, e.question) for e in test}
    fit_pool = [e for e in fit_pool if (e.context, e.question) not in seen]
    rng.shuffle(fit_pool)
    return {
        "steer": fit_pool[: sizes.steer],
        "dev": fit_pool[sizes.steer : sizes.steer + sizes.dev],
        "test": test,
    }


@pytest.mark.parametrize("pools", [("all",), ("train", "test")])
def test_splits_of_a_task_without_duplicates_are_unchanged_by_deduplication(tmp_path, pools):
    """Deduplication must not move a single item of a task without repeated text (published
    benchmark splits stay the same)."""
    rows = _rows(60)
    path = _task_file(tmp_path, rows)
    if len(pools) == 2:
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(90)[60:]))
        spec = yaml.safe_load(path.read_text())
        spec["files"] = {"train": "reviews.jsonl", "test": "t.jsonl"}
        path.write_text(yaml.safe_dump(spec))
    task = load_task(resolve_task(str(path)))
    sizes = SplitSizes(steer=20, dev=10, test=15)
    for seed in range(3):
        assert make_splits(task, sizes, seed) == _splits_before_deduplication(task, sizes, seed)


def test_a_split_smaller_than_asked_is_logged(tmp_path, caplog):
    task = load_task(resolve_task(str(_task_file(tmp_path, _rows(20)))))
    with caplog.at_level(logging.WARNING):
        splits = make_splits(task, SplitSizes(steer=4, dev=100, test=5), seed=0)
    assert len(splits["dev"]) == 11
    assert "split 'dev' has 11 of the 100 examples asked" in caplog.text


def test_a_steer_split_that_takes_everything_is_named(tmp_path):
    task = load_task(resolve_task(str(_task_file(tmp_path, _rows(10)))))
    with pytest.raises(TaskError, match=r"steer asks 50 examples and takes all 7"):
        make_splits(task, SplitSizes(steer=50, dev=2, test=3), seed=0)
