"""The `seater` command line and the settings loader: help with examples, one-line errors naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seater_dist.cli import _parser, main
from seater_dist.config import RunSettings, SettingsError, TrainSettings

COMMANDS = ["synth", "prepare", "embed", "build-tree", "train", "evaluate", "compare", "recommend", "serve", "run",
            "demo"]


def test_the_command_list_is_the_parsers():
    assert sorted(_parser()._subparsers._group_actions[0].choices) == sorted(COMMANDS)  # type: ignore[attr-defined]


def test_help_lists_every_command_and_each_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    sub = _parser()._subparsers._group_actions[0].choices  # type: ignore[attr-defined]
    for command in COMMANDS:
        helptext = sub[command].format_help()
        assert "examples:" in helptext and f"seater {command}" in helptext, command


def test_console_script_runs_and_exits_zero():
    done = subprocess.run([sys.executable, "-m", "seater_dist.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "seater demo" in done.stdout


def test_unknown_setting_in_config_names_the_field(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    with pytest.raises(SettingsError, match=r"run.yaml: train.epochz: Extra inputs are not permitted"):
        RunSettings.from_file(cfg)


def test_bad_value_names_the_field_and_the_constraint(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seater:\n  dropout: 1.5\ntree:\n  k: one\n")
    with pytest.raises(SettingsError) as err:
        RunSettings.from_file(cfg)
    assert "seater.dropout" in str(err.value) and "tree.k" in str(err.value)


def test_missing_and_malformed_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(SettingsError, match="settings file not found"):
        RunSettings.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        RunSettings.from_file(bad)


def test_assignment_is_validated_too():
    s = TrainSettings()
    with pytest.raises(Exception, match="workers"):
        s.workers = 0


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {workers: -1}\n")
    code = main(["train", "--data", str(tmp_path), "--tree", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("seater train: error:") and "train.workers" in err[0]


def test_build_tree_refuses_an_out_that_is_not_a_tree(ray_session, tmp_path, capsys):
    import numpy as np

    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code = main(["build-tree", "--embeddings", str(emb), "--k", "4", "--out", str(precious)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refusing to replace it" in err[0]
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    assert main(["build-tree", "--embeddings", str(emb), "--k", "4", "--out", str(tmp_path / "tree")]) == 0
    assert main(["build-tree", "--embeddings", str(emb), "--k", "4", "--out", str(tmp_path / "tree")]) == 0  # a tree


def test_every_flag_of_every_command_has_help():
    sub = _parser()._subparsers._group_actions[0].choices  # type: ignore[attr-defined]
    for name, parser in sub.items():
        for action in parser._actions:
            assert action.help, f"seater {name} {action.option_strings}: no help text"
