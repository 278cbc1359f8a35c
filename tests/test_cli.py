"""The cxr command: parameters, overrides and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from cxr.cli import build_parser, main
from cxr.config import apply_overrides, load_params
from cxr.errors import CxrError
from tests.factories import REPO_ROOT, kermany_layout


def test_overrides_parse_yaml_values_and_nest():
    params = apply_overrides({"data": {"source": "kaggle"}}, ["data.source=dir", "split.seed=7", "data.npz="])
    assert params == {"data": {"source": "dir", "npz": ""}, "split": {"seed": 7}}
    with pytest.raises(CxrError):
        apply_overrides({}, ["novalue"])


def test_repository_params_have_the_documented_interface():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params["data"]["source"] in {"auto", "kaggle", "sample", "dir", "medmnist"}
    assert {"dir", "npz"} <= set(params["data"])
    assert params["split"]["strategy"] in {"seed", "patient"}
    assert isinstance(params["split"]["seed"], int)


def test_fetch_and_prepare_from_the_command_line(make_dataset, tmp_path, monkeypatch, capsys):
    src = make_dataset(kermany_layout(n_patients=10))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["fetch", "-S", "data.source=dir", "-S", f"data.dir={src}"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 60
    assert main(["prepare", "-S", "prepare.min_images_per_class=1"]) == 0
    assert (tmp_path / "data/prepared/splits.csv").is_file()


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: dir\n  dir: nowhere\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cxr", "fetch"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["cxr: error: nowhere: not a folder (expected a folder in Kaggle layout)"]


def test_missing_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 1
    assert "params.yaml: not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ help


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"cxr": the top-level parser, "cxr fetch": its subcommand's parser, ...}``."""
    top = build_parser()
    found = {"cxr": top}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"cxr {name}": parser for name, parser in action.choices.items()})
    return found


def test_every_option_has_help_and_shows_its_default():
    problems = []
    for name, parser in _parsers().items():
        shown = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = action.help or ""
            if not text.strip() or text == argparse.SUPPRESS:
                problems.append(f"{label}: no help text")
                continue
            if not action.option_strings or action.required or action.nargs == 0:
                continue  # positionals, required options and flags have no default to show
            if action.default in (None, []):
                if "default" not in text.lower():
                    problems.append(f"{label}: help does not say what happens without it")
            elif f"default: {action.default}" not in shown:
                problems.append(f"{label}: default {action.default!r} not shown")
    assert not problems, "\n".join(problems)


def test_every_command_has_a_usage_example_and_no_markup():
    for name, parser in _parsers().items():
        lines = (parser.epilog or "").splitlines()
        assert "example:" in lines and any(line.strip().startswith(name) for line in lines), name
        assert "``" not in parser.format_help(), name  # no raw reStructuredText


def test_log_level_takes_a_choice_in_any_case(capsys):
    assert build_parser().parse_args(["--log-level", "warning", "stages"]).log_level == "WARNING"
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", "bogus", "stages"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert len(error_lines) == 1 and "--log-level" in error_lines[0], err
    assert all(level in error_lines[0] for level in ("DEBUG", "INFO", "WARNING", "ERROR")), err


def test_an_override_of_an_unknown_key_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["fetch", "-S", "data.sorce=dir"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxr: error:"), err
    assert "data.sorce" in lines[0] and "source" in lines[0], err  # the key, and the one meant
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing fetched


def test_a_reader_that_goes_away_stops_the_command_quietly(monkeypatch, capfd):
    """``cxr stages | head -1``: the reader closed the pipe; exit 141 with no error line and no traceback."""
    import os
    import sys

    from cxr.cli import main

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    saved = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        monkeypatch.setattr(sys, "stdout", os.fdopen(os.dup(1), "w", buffering=1))
        assert main(["stages"]) == 141
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "error" not in err, err
