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
