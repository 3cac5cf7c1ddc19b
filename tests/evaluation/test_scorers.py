"""Concept scorers on fixed strings: VADER polarity, Python code vs prose, keywords, and a user's
callable (a bad path is one clear error when the task is read, before any model loads)."""

import sys
import textwrap

import pytest
import yaml

from expertsteer.data.tasks import TaskError, spec_from_yaml
from expertsteer.evaluation.scorers import (
    ScorerError,
    code_like,
    holds_code_block,
    make_scorer,
)


def test_sentiment_scores_known_polarity():
    scorer = make_scorer("sentiment")
    texts = [
        "The weather today is lovely and I feel great.",
        "This is a terrible, awful movie.",
        "The train leaves at nine from platform four.",
        "def f(x):\n    return x + 1",
    ]
    scores = scorer.score(texts)
    # VADER 3.3.2's lexicon (../shared/FACTS.md): 0.836 and -0.727; neutral text and code 0.
    assert scores[0] == pytest.approx(0.836, abs=1e-3)
    assert scores[1] == pytest.approx(-0.727, abs=1e-3)
    assert scores[2] == 0.0 and scores[3] == 0.0
    assert scorer.hits(texts) == [True, False, False, False]


CODE = """Here is how:
def area(radius):
    return 3.14159 * radius ** 2
print(area(2))"""
PROSE = "The committee met on Tuesday. It decided, after a long debate, to postpone the vote."


def test_python_code_tells_code_from_prose():
    scorer = make_scorer("python_code")
    assert scorer.hits([CODE, PROSE, "x = 1", "total = price * count\nprint(total)"]) == [
        True,
        False,
        False,  # one line is not a block
        True,
    ]
    code_score, prose_score = scorer.score([CODE, PROSE])
    assert code_score == pytest.approx(3 / 4)  # three code lines, one prose line
    assert prose_score == 0.0
    # Parses, but holds no def, assignment or call: not code for the concept.
    assert not holds_code_block("x\ny")
    assert code_like("    for item in items:") and not code_like("In the end, it rained.")


def test_keywords_match_words_and_patterns():
    scorer = make_scorer("keywords", {"words": ["ocean"], "patterns": [r"\bwave[sd]?\b"]})
    texts = ["The Ocean was calm.", "She waved.", "oceanic trench", "nothing here"]
    assert scorer.score(texts) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ScorerError, match="bad regular expression"):
        make_scorer("keywords", {"patterns": ["(unclosed"]})
    with pytest.raises(ScorerError, match="at least one"):
        make_scorer("keywords", {})


def test_callable_scorer_runs_the_users_function(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def length(texts):\n    return [len(t) / 10 for t in texts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = make_scorer("callable", {"function": "my_scorers:length", "threshold": 0.3})
    assert scorer.score(["abcde", "a"]) == [0.5, 0.1]
    assert scorer.hits(["abcde", "a"]) == [True, False]
    sys.modules.pop("my_scorers", None)


def _behaviour_yaml(tmp_path, scorer: str, options: dict) -> str:
    path = tmp_path / "task.yaml"
    spec = {
        "name": "mood",
        "type": "behaviour",
        "scorer": scorer,
        "scorer_options": options,
        "files": {"concept": "concept.csv", "prompts": "prompts.jsonl"},
        "fields": {"question": "text", "answer": "label"},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_colon_here", "must be 'module:function'"),
        ("surely_missing_module_xyz:score", "cannot import module 'surely_missing_module_xyz'"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
    ],
)
def test_bad_callable_path_is_one_clear_error_when_the_task_is_read(
    tmp_path, monkeypatch, function, message
):
    loaded = []
    monkeypatch.setattr(
        "expertsteer.models.zoo.load_model", lambda *a, **k: loaded.append(a) or None
    )
    with pytest.raises(TaskError, match=message):
        spec_from_yaml(_behaviour_yaml(tmp_path, "callable", {"function": function}))
    assert not loaded


def test_unknown_scorer_and_scorer_on_other_tasks_are_refused(tmp_path):
    with pytest.raises(TaskError, match="unknown scorer 'vibes'"):
        spec_from_yaml(_behaviour_yaml(tmp_path, "vibes", {}))
    path = tmp_path / "other.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: other
            type: classification
            labels: [a, b]
            scorer: sentiment
            files: {test: x.csv}
            """
        )
    )
    with pytest.raises(TaskError, match="behaviour tasks only"):
        spec_from_yaml(path)
