"""examples/quickstart.py end to end on the packaged pair: it runs, steers, and saves vectors
that carry their strength."""

import itertools
import subprocess
import sys
from pathlib import Path

from expertsteer.method.vectors import load_steering

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_prints_unsteered_and_steered_continuations(tmp_path):
    result = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    lines = result.stdout.splitlines()
    answers: dict[str, list[str]] = {}
    for header, answer in itertools.pairwise(lines):
        if header.startswith("["):
            answers.setdefault(header.split("]")[0][1:], []).append(answer.strip())
    assert set(answers) == {"unsteered", "target +", "expert +", "expert -"}
    for name in ("target +", "expert +", "expert -"):
        assert answers[name] != answers["unsteered"], f"{name} changed nothing"
    saved = load_steering(tmp_path / "quickstart_vector.safetensors")
    assert saved.choice["alpha"] == 0.3 and saved.metadata["source"] == "expert"
    assert "held-out R^2" in lines[-1]
