import subprocess
import sys

import pytest

from expertsteer.cli import main


def test_models_lists_every_packaged_model(capsys):
    main(["models"])
    out = capsys.readouterr().out
    for name in (
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "gemma-3-270m",
        "qwen2.5-coder-1.5b-instruct",
    ):
        assert name in out


def test_generate_on_a_local_directory(tiny_dirs, capsys):
    main(
        ["generate", "--model", str(tiny_dirs["expert"]), "--prompt", "hi", "--max-new-tokens", "3"]
    )
    assert capsys.readouterr().out.startswith("> hi\n")


def test_user_errors_exit_with_one_clear_line():
    with pytest.raises(SystemExit, match="expertsteer: error: unknown model 'nope'"):
        main(["prepare", "nope"])


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "expertsteer", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("models", "prepare", "generate", "demo"):
        assert command in result.stdout
