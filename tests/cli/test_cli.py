"""The command line's contract: featurelens's own errors print one line (exit 2), bugs keep their traceback (exit 1),
--debug shows every traceback, and each flag means one thing. No model is loaded here."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import featurelens.cli as cli
from featurelens.cli import build_parser, common, main
from featurelens.errors import FeaturelensError, InputError, MissingFileError


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


def _walk() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser], dict[str, str]]:
    """The real parser, its subcommands and their one-line help, discovered from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices), {a.dest: a.help for a in sub._choices_actions}


COMMANDS = sorted(_walk()[1])


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_flag_means_one_thing_in_every_command():
    parser, commands, _ = _walk()
    assert len(commands) >= 10  # the walk found the commands (no whitelist: new ones are checked as they come)
    shared_spellings = {flag: key for key, o in common.OPTIONS.items() for flag in o.flags}
    uses: dict[str, list[tuple[str, argparse.Action]]] = {}
    for name, p in [("featurelens", parser), *commands.items()]:
        dests = [a.dest for a in _options(p)]
        assert len(dests) == len(set(dests)), f"{name}: two options write {dests}"
        for a in _options(p):
            assert a.help and a.help.strip(), f"{name} {a.option_strings}: no help text"
            for flag in a.option_strings:
                uses.setdefault(flag, []).append((name, a))
                # a spelling that has a shared meaning is only ever used with that meaning
                if flag in shared_spellings:
                    assert getattr(a, "shared", None) == shared_spellings[flag], (name, flag)
    for flag, where in uses.items():
        if len(where) < 2:
            continue
        # used by several commands: defined once in common.OPTIONS, so one dest, type, action and meaning
        keys = {getattr(a, "shared", None) for _, a in where}
        assert len(keys) == 1 and None not in keys, f"{flag} is defined separately in {[n for n, _ in where]}"
        key = keys.pop()
        meaning = common.OPTIONS[key].meaning
        for name, a in where:
            assert (a.dest, a.type, type(a), a.nargs) == (where[0][1].dest, where[0][1].type, type(where[0][1]),
                                                         where[0][1].nargs), (flag, name)
            assert a.help.startswith(meaning), (flag, name, a.help)


def test_flags_that_meant_two_things_are_gone():
    _, commands, _ = _walk()
    flags = {name: {f for a in _options(p) for f in a.option_strings} for name, p in commands.items()}
    # -n/--rows is how many rows a listing shows, everywhere it appears
    for name, p in commands.items():
        for a in _options(p):
            if "-n" in a.option_strings:
                assert a.option_strings[:2] == ["-n", "--rows"] and a.dest == "rows", name
    # units in the name: steps when training, seconds when analysing
    assert not any("--checkpoint-every" in f for f in flags.values())
    assert "--checkpoint-steps" in flags["train"] and "--checkpoint-seconds" in flags["analyze"]
    # a training batch is a hyperparameter in tokens; --batch-size elsewhere only trades memory for speed
    assert "--batch-tokens" in flags["train"] and "--batch-size" not in flags["train"]
    # --hook is a hook name; patching picks a site kind
    assert "--site" in flags["patch"] and "--hook" not in flags["patch"]
    # --scale is intervene's edit; demo multiplies its budgets with --budget-scale
    assert "--budget-scale" in flags["demo"] and "--scale" not in flags["demo"]
    # serve reads the global data directory
    assert all(a.dest != "serve_data_dir" for a in _options(commands["serve"]))


@pytest.mark.parametrize("argv", [
    ["analyze", "somewhere", "--checkpoint-every", "5"],
    ["train", "--hook", "blocks.0.hook_resid_post", "--checkpoint-every", "5"],
    ["train", "--hook", "blocks.0.hook_resid_post", "--batch-size", "512"],
    ["graph-check", "g.json", "--features", "3"],
    ["patch", "--clean", "a", "--corrupt", "b", "--answer", " c", "--hook", "z"],
    ["demo", "--scale", "2"],
    ["next-token", "Hi", "--row", "3"],  # no abbreviations: a prefix would mean whichever flag it happens to start
])
def test_ambiguous_old_spellings_and_abbreviations_are_refused(argv, capsys):
    assert main(argv) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_unambiguous_old_spelling_still_works():
    parse = build_parser().parse_args
    args = parse(["graph-check", "g.json", "--paths", "3"])
    assert args.rows == 3 and args.ablate_top == 10
    assert parse(["explain", "somewhere", "--redo"]).overwrite and not parse(["explain", "somewhere"]).overwrite


def test_every_command_has_help_text():
    _, commands, helps = _walk()
    assert set(helps) == set(commands)
    for name in commands:
        assert helps[name] and helps[name].strip(), name


@pytest.mark.parametrize("name", COMMANDS)
def test_help_works_for_every_command(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: featurelens {name}") and "--data-dir" in out


def test_data_dir_before_or_after_the_command_means_the_same(tmp_path, monkeypatch):
    from featurelens import paths

    parse = build_parser().parse_args
    assert parse(["serve", "--data-dir", "A"]).data_dir == "A"
    assert parse(["--data-dir", "A", "serve"]).data_dir == "A"
    assert parse(["--data-dir", "A", "serve", "--data-dir", "B"]).data_dir == "B"
    assert parse(["serve"]).data_dir is None and parse(["models", "--debug"]).debug
    monkeypatch.setattr(paths, "_override", None)
    served = []
    monkeypatch.setattr(cli.serve, "serve", lambda host, port, token, device=None, db=None:
                        served.append(paths.data_dir()) or 0)
    assert main(["serve", "--data-dir", str(tmp_path / "served")]) == 0
    assert served == [tmp_path / "served"]


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


# ------------------------------------------------------------------ -m: the dictionary's model unless told otherwise
class _Stop(InputError):
    pass


def _sae(model_name: str):
    from featurelens.dictionaries import DictionaryConfig, SparseDictionary

    return SparseDictionary(DictionaryConfig(d_in=8, d_sae=16, arch="topk", k=2, hook_name="blocks.0.hook_resid_post",
                                             model_name=model_name))


def _transcoders(model_name: str):
    from featurelens.dictionaries import DictionaryConfig, SparseDictionary, TranscoderSet

    return TranscoderSet({layer: SparseDictionary(DictionaryConfig(
        d_in=8, d_sae=16, arch="topk", k=2, transcoder=True, hook_name=f"blocks.{layer}.ln2.hook_normalized",
        hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model_name)) for layer in (0, 1)})


def test_recorded_model_reads_every_kind_of_dictionary():
    from featurelens.dictionaries import CLTConfig, CrossLayerTranscoder

    assert common.recorded_model(_sae("some-model")) == "some-model"
    assert common.recorded_model(_transcoders("tc-model")) == "tc-model"
    assert common.recorded_model(_transcoders("tc-model")[1]) == "tc-model"
    clt = CrossLayerTranscoder(CLTConfig(layers=[0, 1], d_in=8, d_sae=16, arch="topk", k=2, model_name="clt-model"))
    assert common.recorded_model(clt) == "clt-model"
    assert common.recorded_model(_sae("")) == ""


@pytest.fixture()
def saved(tmp_path):
    from featurelens.dictionaries import save_dictionary, save_transcoder_set

    out = {}
    for name in ("made-up-model", ""):
        out["sae", name] = str(save_dictionary(_sae(name), tmp_path / f"sae-{name or 'none'}"))
        out["tc", name] = str(save_transcoder_set(_transcoders(name), tmp_path / f"tc-{name or 'none'}"))
    return out


def _runs(saved, name: str) -> dict[str, list[str]]:
    sae, tc = saved["sae", name], saved["tc", name]
    return {"steer": ["steer", sae, "Hello", "--ablate", "1"], "eval": ["eval", sae], "analyze": ["analyze", sae],
            "graph": ["graph", tc, "Hello"], "intervene": ["intervene", tc, "Hello", "--set", "0:1@0=0"]}


def test_commands_with_a_dictionary_load_the_model_it_records(saved, monkeypatch, capsys):
    asked: list[tuple[str, dict]] = []

    def load_model(name, **kw):
        asked.append((name, kw))
        raise _Stop("stopped before running the model")

    monkeypatch.setattr("featurelens.models.loader.load_model", load_model)
    for command, argv in _runs(saved, "made-up-model").items():
        asked.clear()
        assert main(argv) == 2, command
        assert "stopped before running the model" in capsys.readouterr().err
        assert [name for name, _ in asked] == ["made-up-model"], command
        asked.clear()
        assert main(argv[:1] + ["-m", "other-model"] + argv[1:]) == 2  # -m wins
        assert [name for name, _ in asked] == ["other-model"], command
    asked.clear()
    assert main(["steer", saved["sae", "made-up-model"], "Hi", "--ablate", "1", "--dtype", "bfloat16"]) == 2
    assert asked == [("made-up-model", {"dtype": "bfloat16", "device": None})]


def test_a_dictionary_that_names_no_model_needs_m(saved, monkeypatch, capsys):
    def load_model(name, **kw):
        raise AssertionError(f"no model should be loaded, got {name!r}")

    monkeypatch.setattr("featurelens.models.loader.load_model", load_model)
    for command, argv in _runs(saved, "").items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert "does not say which model it was trained on; pass -m MODEL" in err, (command, err)


# ------------------------------------------------------------------ user text is printed as it is
ODD = "[/quote] cat"  # rich markup would fail on this (MarkupError) or swallow it
ODD2 = "[bold]x[/bold] :smile:"


def test_search_prints_markup_like_text_as_it_is(monkeypatch, capsys):
    import featurelens.analysis as analysis
    from featurelens.search.by_text import TextHit, TextSearchResult
    from featurelens.search.by_token import PromoteHit
    from featurelens.search.concept import SearchHit

    class Analysis:
        model_name = ""  # no model known: the concept search is not checked by steering

        def search(self, query, k, method):
            return [SearchHit(feature=1, score=0.5, label=ODD, method="lexical", near_max=[ODD2], max_tokens=[ODD])]

        def search_text(self, text, k):
            return TextSearchResult(text=text, tokens=[ODD, ODD2], overall=[TextHit(1, 2.0, 0.5, 0, ODD)],
                                    per_token=[[(1, 2.0, 0.5, ODD2)], []])

        def search_promotes(self, token, k):
            return [PromoteHit(1, 1.0, 2.0, ODD2)]

    monkeypatch.setattr(analysis, "open_analysis", lambda path: Analysis())
    monkeypatch.setenv("COLUMNS", "400")  # one line per table row, so the texts are not wrapped
    for argv in (["search", "x", ODD], ["search", "x", "--text", ODD], ["search", "x", "--promotes", ODD]):
        assert main(argv) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert ODD in out and "MarkupError" not in out, argv
    assert main(["search", "x", "y"]) == 0
    assert ODD2 in capsys.readouterr().out  # not bold text and an emoji


def test_checked_search_table_marks_the_hits_it_did_not_steer(monkeypatch, capsys):
    """The steering check stops at the first match that steers: the table shows the leader's ratio and strength,
    and "not steered" for the hits after it (steer_ratio None), instead of failing to format None."""
    import featurelens.analysis as analysis
    import featurelens.interventions as interventions
    from featurelens.search.concept import SearchHit

    class Analysis:
        model_name = "some-model"  # a model is known: the search is checked by steering

    lead = SearchHit(feature=7, score=1.9, label="film", match_score=0.9, steer_ratio=8.5, steer_strength=1.0,
                     steer_words=["film", "movie"], steer_promotes=["cinema"])
    rest = SearchHit(feature=3, score=1.0, label="movie", match_score=1.0, steer_words=["film", "movie"])
    monkeypatch.setattr(analysis, "open_analysis", lambda path: Analysis())
    monkeypatch.setattr(interventions, "steerable_search", lambda *a, **kw: [lead, rest])
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["search", "x", "movies"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "checked by steering" in out and "(1) 8.5x; cinema" in out and "not steered" in out
    assert out.index("film") < out.index("not steered")


def test_generate_prints_prompts_and_continuations_as_they_are(monkeypatch, capsys):
    class Model:
        def generate(self, prompts, **kw):
            return [" " + ODD for _ in prompts]

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: Model())
    assert main(["generate", ODD2, "[red]"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{ODD2} {ODD}", f"[red] {ODD}"]


def test_renamed_flags_reach_the_library_with_their_units(saved, monkeypatch, capsys):
    import featurelens.analysis as analysis
    import featurelens.dictionaries as dictionaries

    got: dict[str, dict] = {}

    def capture(name):
        def run(*args, **kw):
            got[name] = kw
            raise _Stop("captured")
        return run

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: object())
    monkeypatch.setattr(analysis, "analyze", capture("analyze"))
    monkeypatch.setattr(dictionaries, "train_saes", capture("train_saes"))
    assert main(["analyze", saved["sae", "made-up-model"], "--checkpoint-seconds", "7", "--batch-size", "4",
                 "--tokens", "2k"]) == 2
    assert (got["analyze"]["checkpoint_every"], got["analyze"]["batch_size"], got["analyze"]["n_tokens"]) == (7.0, 4, 2000)
    assert main(["train", "--hook", "blocks.0.hook_resid_post", "--checkpoint-steps", "9", "--batch-tokens", "2k"]) == 2
    assert (got["train_saes"]["checkpoint_every"], got["train_saes"]["batch_size"]) == (9, 2000)
    capsys.readouterr()


def test_feature_prints_labels_and_corpus_tokens_as_they_are(monkeypatch, capsys):
    import featurelens.analysis as analysis
    from featurelens.analysis import FeatureDashboard, TokenExample

    dash = FeatureDashboard(index=3, d_sae=16, model="m", hook_name="h", label=ODD, label_provenance="user",
                            labels=[], density=0.1, n_fires=1, n_tokens=10, max_act=2.0, mean_act=1.0,
                            hist_edges=[0.0, 1.0, 2.0], hist_counts=[0, 1], logit_up=[("[/b]", 1, 0.5)],
                            logit_down=[("[red]", 2, -0.5)], similar=[], cofiring=[],
                            top_examples=[TokenExample(tokens=["a", ODD2], acts=[0.0, 2.0], index=1, act=2.0, ctx=0,
                                                       pos=1)])

    class Analysis:
        def check_index(self, index):
            return int(index)

        def feature(self, index):
            return dash

    monkeypatch.setattr(analysis, "open_analysis", lambda path: Analysis())
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["feature", "x", "3"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert ODD in out and ODD2 in out and "'[/b]'" in out and "'[red]'" in out
