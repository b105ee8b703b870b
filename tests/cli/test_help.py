"""`pidec --help` and every command's help: flags read as flags, and the shared options agree."""

import pytest
from click.testing import CliRunner

from pidec.cli import command

GROUP = command()


@pytest.mark.parametrize("name", [None, *sorted(GROUP.commands)])
def test_help_shows_flags_as_flags(name):
    args = ([name] if name else []) + ["--help"]
    result = CliRunner().invoke(GROUP, args, prog_name="pidec", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help" in result.output


def test_main_runs_the_fixed_command(monkeypatch, capsys):
    import sys

    from pidec.cli import main

    monkeypatch.setattr(sys, "argv", ["pidec", "generate", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--no-pack" in out and "<bool>" not in out


def test_generate_help_names_every_key_it_prints():
    result = CliRunner().invoke(GROUP, ["generate", "--help"], prog_name="pidec", terminal_width=200)
    for key in ("outputs", "usage", "timings", "truncations"):
        assert f'"{key}"' in result.output


@pytest.mark.parametrize(
    "name, classes",
    [
        ("serve", ("pidec.serving.settings:ServeSettings", "pidec.serving.settings:ServerSettings")),
        ("run", ("pidec.cli.run:RunOptions",)),
        ("bench", ("pidec.cli.bench:BenchOptions",)),
    ],
)
def test_options_are_the_settings_fields(name, classes):
    """A command's options are its settings classes' command-line fields (declared once, with
    their defaults and panels) plus the shared runtime options: nothing declared by hand."""
    import dataclasses
    import importlib

    params = {p.name: p for p in GROUP.commands[name].params if p.name != "help"}
    declared = set()
    for path in classes:
        module, cls = path.split(":")
        for f in dataclasses.fields(getattr(importlib.import_module(module), cls)):
            if f.metadata["cli"]:
                declared.add(f.name)
                assert params[f.name].rich_help_panel == f.metadata["panel"], f.name
                if f.default is not dataclasses.MISSING:
                    assert params[f.name].default == f.default, f.name
    shared = {"model", "device", "dtype", "quantize", "tokenizer", "no_pack", "layout"}
    shared |= {"prefix_template", "row_template", "chat_template"}  # decoder-only checkpoints
    assert declared <= set(params) and set(params) - declared <= shared, set(params) - declared


def test_help_text_brackets_are_shown_not_parsed():
    """Help text is plain text: an install hint's extra (".[ct2]") must not vanish as rich markup."""
    result = CliRunner().invoke(GROUP, ["bench", "--help"], prog_name="pidec", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert 'pip install ".[ct2]"' in " ".join(result.output.split())
