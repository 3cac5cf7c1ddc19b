import re
import subprocess
import sys

import pytest

from expertsteer.pipeline.cli import main
from tests.tiny_task import text_task


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


def test_version_comes_from_the_package(capsys):
    import expertsteer

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"expertsteer {expertsteer.__version__}"


def test_a_missing_pipeline_module_names_the_extra(monkeypatch):
    from expertsteer.pipeline import cli

    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "_report", needs_matplotlib)
    with pytest.raises(SystemExit, match=r"expertsteer\[pipeline\]"):
        main(["report", "runs/x"])


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "expertsteer", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("models", "prepare", "generate", "smoke-test"):
        assert command in result.stdout


def test_console_filter_keeps_headers_and_warnings_and_drops_detail_and_tips():
    import logging

    from expertsteer.pipeline.console import _ConsoleFilter

    def record(name, level, message):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    quiet, verbose = _ConsoleFilter(False), _ConsoleFilter(True)
    header = record("expertsteer.pipeline.experiment", logging.INFO, "[sst2 1/13] align: running")
    batch = record("expertsteer.evaluation.evaluate", logging.INFO, "scored batch 3 of 40")
    tip = record("lightning.pytorch.utilities.rank_zero", logging.INFO, "💡 Tip: try litlogger")
    warning = record("expertsteer.method.pair", logging.WARNING, "only 8 pairs")
    lightning_hint = record("py.warnings", logging.WARNING, "log_every_n_steps ...")
    assert quiet.filter(header) and quiet.filter(warning)
    assert not quiet.filter(batch) and not quiet.filter(tip) and not quiet.filter(lightning_hint)
    assert verbose.filter(batch) and not verbose.filter(tip)


def test_tasks_check_shows_three_prompts_with_answers_and_the_label_balance(tmp_path, capsys):
    rows = [{"text": f"Review number {i}.", "y": ["bad", "good"][i % 3 == 0]} for i in range(9)]
    main(["tasks", "--check", str(text_task(tmp_path, rows))])
    out = capsys.readouterr().out
    assert "task 'reviews' (classification): 9 examples (test 9)" in out
    assert (
        out.count("--- test/") == 3 and "Review number 2." in out and "Review number 3" not in out
    )
    assert re.search(r"bad\s+6\s+66\.7%", out) and re.search(r"good\s+3\s+33\.3%", out)


def test_tasks_lists_pool_sizes_and_where_each_task_comes_from(tmp_path, capsys, monkeypatch):

    monkeypatch.setenv("EXPERTSTEER_DATA", str(tmp_path))  # nothing local: hub ids are listed
    main(["tasks"])
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert "all 1000" in row["arithmetic"] and row["arithmetic"].endswith("generated")
    assert row["sst2"].endswith("hub SetFit/sst2") and row["piqa"].endswith("(no hub copy)")
    assert f"data root: {tmp_path}" in lines[-1]
