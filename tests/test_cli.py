"""The command line's contract: featurelens's own errors print one line (exit 2), bugs keep their traceback (exit 1),
--debug shows every traceback, and each flag means one thing. No model is loaded here."""

from __future__ import annotations

import subprocess
import sys

import pytest

import featurelens.cli as cli
from featurelens.cli import build_parser, main
from featurelens.errors import FeaturelensError, InputError, MissingFileError


def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_featurelens_error_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-dictionary"
    assert main(["feature", str(missing), "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"featurelens: error: {missing}: no such dictionary or analysis directory"]
    assert "Traceback" not in err


def test_every_named_error_is_a_featurelens_error():
    from featurelens.analysis import NotAnalyzedError
    from featurelens.data.corpus import CorpusError
    from featurelens.dictionaries.sae import FeatureIndexError
    from featurelens.engine.hooked import EmptyPromptError
    from featurelens.engine.hooks import UnknownHookError
    from featurelens.models.gguf import CorruptFileError
    from featurelens.models.loader import UnknownModelError

    for cls in (UnknownHookError, CorruptFileError, FeatureIndexError, EmptyPromptError, UnknownModelError,
                CorpusError, NotAnalyzedError, InputError, MissingFileError):
        assert issubclass(cls, FeaturelensError), cls
    # and they stay what Python code catches today
    assert issubclass(UnknownHookError, KeyError) and issubclass(InputError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError)


def test_a_bug_shows_its_traceback(monkeypatch, capsys):
    def broken(args):
        return {}["a key that a bug forgot"]

    monkeypatch.setattr(cli.models, "cmd_models", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a key that a bug forgot'" in err
    assert "featurelens: error:" not in err  # not dressed up as a user error

    def typo(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cli.models, "cmd_models", typo)
    assert main(["models"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_debug_shows_the_traceback_of_a_featurelens_error(tmp_path, capsys):
    assert main(["--debug", "feature", str(tmp_path / "nowhere"), "3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "MissingFileError" in err
    assert err.strip().splitlines()[-1].startswith("featurelens: error:")


def test_the_installed_entry_point_behaves_the_same(tmp_path):
    """Through a real process: one line on stderr, exit status 2, nothing written to the user's data directory."""
    r = subprocess.run([sys.executable, "-m", "featurelens", "--data-dir", str(tmp_path / "home"), "feature",
                        str(tmp_path / "nowhere"), "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("featurelens: error:")


def test_usage_errors_exit_2(capsys):
    assert main(["next-token", "Hi", "--top-k", "3"]) == 2  # --top-k is a sampling parameter (generate) only
    assert "unrecognized arguments: --top-k" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main([]) == 2


def test_flags_mean_one_thing():
    cmds = _subcommands()

    def flags(name: str) -> dict[str, str]:
        return {opt: a.dest for a in cmds[name]._actions for opt in a.option_strings}

    # --tokens everywhere a token budget is given
    for name in ("train", "eval", "analyze"):
        assert flags(name)["--tokens"] == "tokens", name
        assert "--n-tokens" not in flags(name)
    # -k is TopK's k and nothing else
    for name, parser in cmds.items():
        if "-k" in flags(name):
            assert name == "train" and flags(name)["-k"] == "k", name
    # --top-k is the sampling parameter; row counts are -n / --rows
    assert "--top-k" in flags("generate")
    assert [name for name in cmds if "--top-k" in flags(name)] == ["generate"]
    for name in ("next-token", "search"):
        assert flags(name)["-n"] == flags(name)["--rows"] == "rows"
    # the corpus is --corpus everywhere
    for name in ("train", "eval", "analyze"):
        assert flags(name)["--corpus"] == "corpus" and "--source" not in flags(name)
    # the dictionary path is the first positional argument of every command that takes one
    for name, dest in (("steer", "path"), ("eval", "path"), ("analyze", "path"), ("search", "path"),
                       ("feature", "path")):
        positionals = [a.dest for a in cmds[name]._actions if not a.option_strings and a.dest != "help"]
        assert positionals[0] == dest, name
        assert "--dict" not in flags(name) and "--transcoders" not in flags(name)
    # graph and intervene take `PATH PROMPT` like the others, or `--transcoders PATH PROMPT` as the issue spells it
    for name in ("graph", "intervene"):
        positionals = [a.dest for a in cmds[name]._actions if not a.option_strings and a.dest != "help"]
        assert positionals == ["inputs"], name
        assert flags(name)["--transcoders"] == "transcoders" and "--dict" not in flags(name)


def test_steer_checks_its_specs_before_loading_anything(capsys):
    assert main(["steer", "nowhere", "Hello", "--feature", "12:lots"]) == 2
    assert "strength 'lots' is not a number" in capsys.readouterr().err
    assert main(["steer", "nowhere", "Hello", "--feature", "12"]) == 2
    assert "expected IDX:STRENGTH" in capsys.readouterr().err
    assert main(["steer", "nowhere", "Hello"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["steer", "nowhere", "Hello", "--ablate", "1"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["search", "somewhere"], "give exactly one of"),
    (["generate", "-m", "no-such-model-xyz", "Hello"], "no-such-model-xyz"),
])
def test_bad_input_names_the_problem(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
