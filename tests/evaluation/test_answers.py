"""Answer extraction from generated text: numbers, option letters and label words; habit rate."""

import pytest

from expertsteer.evaluation.answers import extract_number, extract_option, habit_rate, numbers_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42.0),
        ("42", 42.0),
        ("It costs $1,234.50 in total", 1234.5),
        ("12,345,678 people", 12345678.0),
        ("She lost -$5 and then $-7", -7.0),
        ("x = -3.5", -3.5),
        ("−8 degrees", -8.0),
        ("10 - 5 = 5", 5.0),
        ("first 3, then 4, finally 9", 9.0),
        ("1,2,3", 3.0),
        ("about .5 of it", 0.5),
        ("#### 72", 72.0),
        ("**18**\n", 18.0),
        ("answer: 7 apples.", 7.0),
        ("0.25.", 0.25),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_match():
    assert numbers_match(5.0, 5)
    assert numbers_match(1234.0000001, 1234.0)
    assert not numbers_match(5.01, 5.0)
    assert not numbers_match(None, 5.0)
    assert not numbers_match(float("nan"), 5.0)
    assert numbers_match(0.1 + 0.2, 0.3)


@pytest.mark.parametrize(
    ("text", "letters", "expected"),
    [
        ("B", True, 1),
        ("(C) tree", True, 2),
        ("A. red", True, 0),
        ("The answer is B.", True, 1),
        ("I think the apple.", True, 1),
        ("A cat sat on a stone", True, 0),  # no letter answer: the option text "stone"
        ("E", True, None),  # not one of the three options
        ("Negative, clearly.", False, 1),
        ("It is not positive; it is negative", False, 0),
        ("unsure", False, None),
    ],
)
def test_extract_option(text, letters, expected):
    choices = ("stone", "apple", "tree") if letters else ("positive", "negative")
    assert extract_option(text, choices, letters) == expected


def test_habit_rate():
    assert habit_rate([0, 0, 1, 0]) == 0.75
    assert habit_rate([None, None, 1, 2]) == 0.25
    assert habit_rate([None]) == 0.0
