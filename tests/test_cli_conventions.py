"""Every command held to the command line's conventions (issue 19; docs/CLI.md states them).

The commands and their flags are read from deepnet.cli, so a command or flag added later is held to the
same rules without editing this file.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepnet.cli import DeepnetCLI, main, prepare_args
from deepnet.cli import args as cli_args
from deepnet.cli.commands import GROUP_COMMANDS, Activations, show_progress
from deepnet.cli.conventions import COMMAND_ALIASES, FLAG_ALIASES, FLAG_NAME, SHORT_FLAGS, flag_name
from deepnet.cli.help import parse_doc
from deepnet.cli.main import finish_command
from deepnet.errors import ConfigError
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")


def every_command() -> dict[str, object]:
    """Each command as typed (aliases and the activations subcommands included) and its function."""
    out = {}
    for name, value in vars(DeepnetCLI).items():
        if isinstance(value, staticmethod):
            out[name.replace("_", "-")] = value.__func__
    out["activations"] = Activations.__call__
    for action in GROUP_COMMANDS:
        out[f"activations {action}"] = getattr(Activations, action)
    return out


COMMANDS = every_command()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_h_and_help_print_help_and_exit_0_for_every_command(command, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*command.split(), flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: deepnet "), out[:200]
    assert err == "" and "INFO" not in out and "Traceback" not in out
    assert "--help" in out and "-h" in out
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_help_comes_first_even_after_a_bad_flag_or_a_missing_argument(capsys):
    for line in (["export-raw", "-h"], ["train-mlp", "--hidden", "x", "-h"], ["check", "--help"]):
        assert main(line) == 0, line
        assert capsys.readouterr().out.startswith("usage: deepnet ")


def test_top_level_help_lists_every_command_with_dashes(capsys):
    for line in ([], ["-h"], ["--help"]):
        assert main(line) == 0
        out = capsys.readouterr().out
        for name in COMMANDS:
            assert name.split()[0] in out
        assert "train_mlp" not in out and "eval_dense" not in out and "INFO" not in out


def test_version(capsys):
    import deepnet

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"deepnet {deepnet.__version__}"


def _flags(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def test_every_flag_follows_the_naming_convention():
    for command, fn in COMMANDS.items():
        for name in _flags(fn):
            assert FLAG_NAME.match(flag_name(name)), (command, name)
            assert name not in ("help", "version", "debug"), (command, name)  # reserved


def _base_kinds(param: inspect.Parameter) -> frozenset[str]:
    return frozenset(cli_args.kinds(param) - {"None"})


def test_one_flag_name_has_one_type_in_every_command():
    """A flag spelled the same in two commands takes the same kind of value in both."""
    seen: dict[str, tuple[str, frozenset[str]]] = {}
    for command, fn in COMMANDS.items():
        for name, param in _flags(fn).items():
            kinds = _base_kinds(param)
            first = seen.setdefault(name, (command, kinds))
            assert first[1] == kinds, f"--{flag_name(name)}: {first[0]} {set(first[1])}, {command} {set(kinds)}"


def test_no_short_flag_has_two_meanings_and_h_is_help():
    assert SHORT_FLAGS["h"] == "help"
    assert len(set(SHORT_FLAGS.values())) == len(SHORT_FLAGS)
    every_flag = {name for fn in COMMANDS.values() for name in _flags(fn)} | {"help"}
    for short, long in SHORT_FLAGS.items():
        assert len(short) == 1 and long in every_flag, (short, long)


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if " " not in c))
def test_the_help_of_every_command_shows_its_short_flags_and_no_other(command, capsys):
    main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    flags = _flags(COMMANDS[command])
    for short, long in SHORT_FLAGS.items():
        shown = f"-{short}, --{flag_name(long)}" in out
        assert shown == (long in flags or long == "help"), (command, short)


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if " " not in c))
def test_every_short_flag_reaches_its_long_flag(command):
    fn = COMMANDS[command]
    flags = _flags(fn)
    for short, long in SHORT_FLAGS.items():
        if long not in flags or long == "help":
            continue
        value = [] if "bool" in cli_args.kinds(flags[long]) else ["7"]
        required = ["x.h5" for p in flags.values() if p.default is inspect.Parameter.empty and p.name != long]
        args = [command, *required, f"-{short}", *value]
        assert any(a.startswith(f"--{long}=") for a in prepare_args(args)), args


def test_the_model_is_a_word_or_model_in_every_command_that_has_one():
    for command, fn in COMMANDS.items():
        if "model" not in _flags(fn):
            continue
        words = command.split()
        assert prepare_args([*words, "m.h5"]) == prepare_args([*words, "--model", "m.h5"]) \
            == prepare_args([*words, "-m", "m.h5"]), command


def test_aliases_reach_the_flag_they_stand_for():
    assert COMMAND_ALIASES == {"train-dense": "train", "eval-dense": "eval"}
    for command, fn in COMMANDS.items():
        flags = _flags(fn)
        required = ["x.h5" for p in flags.values() if p.default is inspect.Parameter.empty]
        for alias, target in FLAG_ALIASES.items():
            if target in flags and alias not in flags:
                got = prepare_args([*command.split(), *required, f"--{flag_name(alias)}", "5"])
                assert f"--{target}=5" in got, (command, alias)


def test_switches_take_true_false_as_the_next_word_and_no_dash_or_no():
    assert prepare_args(["train", "--progress", "False"])[-1] == "--progress=False"
    assert prepare_args(["train", "--in-memory", "true", "m.h5"]) == ["train", "--in_memory=True", "--model='m.h5'"]
    assert prepare_args(["train", "--no-in-memory"]) == prepare_args(["train", "--noin-memory"]) \
        == ["train", "--in_memory=False"]
    assert prepare_args(["train", "--no-progress"])[-1] == "--progress=False"


def test_did_you_mean_for_commands_flags_and_actions(capsys):
    for line, hint in ((["trian"], "did you mean train?"), (["train", "--stpes", "3"], "did you mean --steps?"),
                       (["eval", "--test-sample", "3"], "did you mean --test-samples?"),
                       (["activations", "chek"], "did you mean check?")):
        assert main(line) == 2
        err = capsys.readouterr().err
        assert err.startswith("deepnet: error: ") and hint in err and err.count("\n") == 1, err


def test_an_integral_float_is_an_integer_and_a_fraction_is_refused():
    sig = inspect.signature(DeepnetCLI.train)
    given = {"steps": 1000.0}
    cli_args.check_values(sig, given)
    assert given == {"steps": 1000} and type(given["steps"]) is int
    with pytest.raises(ConfigError, match=r"--steps must be an integer, got 1000.5"):
        cli_args.check_values(sig, {"steps": 1000.5})


def test_every_help_text_is_whole_sentences_shown_whole(capsys):
    """The help once cut --holdout's and --ema's texts mid-sentence: every argument's text is complete
    (ends with a full stop or a closing parenthesis) and appears whole in the command's help."""
    for command, fn in COMMANDS.items():
        doc = parse_doc(fn.__doc__)
        params = set(_flags(fn)) - {"json", "quiet", "progress"}
        assert params <= set(doc.args), (command, params - set(doc.args))
        main([*command.split(), "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for name in params:
            text = doc.args[name]
            assert text.endswith((".", ")")), (command, name, text)
            assert text.rstrip(".") in out, (command, name)


def test_progress_follows_the_flag_then_the_environment_then_the_terminal(monkeypatch):
    monkeypatch.delenv("DEEPNET_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(None, as_json=False, quiet=False) is True
    assert show_progress(None, as_json=True, quiet=False) is False
    assert show_progress(None, as_json=False, quiet=True) is False
    assert show_progress(False, as_json=False, quiet=False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert show_progress(None, as_json=False, quiet=False) is False
    assert show_progress(True, as_json=False, quiet=False) is True
    monkeypatch.setenv("DEEPNET_PROGRESS", "1")
    assert show_progress(None, as_json=False, quiet=False) is True
    monkeypatch.setenv("DEEPNET_PROGRESS", "yes")
    with pytest.raises(ConfigError, match=r"\$DEEPNET_PROGRESS must be 0 or 1"):
        show_progress(None, as_json=False, quiet=False)


def test_finish_command_replaces_the_run_length_with_until_step():
    assert finish_command(["train", "m.h5", "--steps", "400", "--in-memory"], 800) == \
        "deepnet train m.h5 --in-memory --until-step 800"
    assert finish_command(["train", "-n", "5", "--until-step=9", "--model", "a b.h5"], 9) == \
        "deepnet train --model 'a b.h5' --until-step 9"


def _train(tmp_path: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """A tiny training run in a subprocess, stderr to a file (as a redirected log is)."""
    log = tmp_path / "err.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "deepnet", "train", str(tmp_path / "m.h5"), "--layers", "30",
                               "--steps", "6", "--report-every", "2", "--test-samples", "50", *flags],
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=300,
                              env={**os.environ, **(env or {})}, cwd=tmp_path)
    return proc, log.read_bytes().decode()  # as written: a bar redraws with \r


@needs_mnist
def test_a_redirected_run_writes_no_progress_bar_updates(tmp_path):
    proc, err = _train(tmp_path, env={"DEEPNET_PROGRESS": ""})
    assert proc.returncode == 0, err
    assert "\r" not in err and "step/s" not in err and "it/s" not in err, err
    assert "step" in proc.stdout and "test" in proc.stdout  # the table and the result still print
    # The same run with bars asked for does write them: the check above can fail.
    proc, err = _train(tmp_path, "--progress", env={"DEEPNET_PROGRESS": ""})
    assert proc.returncode == 0 and "\r" in err and "step/s" in err


@needs_mnist
def test_quiet_prints_only_the_final_result(tmp_path):
    proc, err = _train(tmp_path, "--quiet", "--json")
    assert proc.returncode == 0 and err == ""
    (final,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert final["event"] == "final" and final["step"] == 6
    proc, err = _train(tmp_path, "-q", "--steps", "2")
    assert proc.returncode == 0 and err == ""
    assert proc.stdout.startswith("model ") and "ETA" not in proc.stdout  # the summary, not the report table


@needs_mnist
def test_train_and_eval_act_on_the_file_s_kind(tmp_path, capsys):
    """`deepnet eval` on an MLP file refused and named eval-mlp; now eval and train dispatch on the kind."""
    path = str(tmp_path / "mlp.h5")
    assert main(["train-mlp", path, "--hidden", "8", "--steps", "3", "--batch", "4", "--test-samples", "0",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", path, "--steps", "2", "--test-samples", "20", "--json", "--quiet"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["step"] == 5 and final["hidden"] == 8 and final["test_samples"] == 20
    assert main(["eval", path, "--test-samples", "30", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["samples"] == 30 and figures["hidden"] == 8 and figures["step"] == 5
    assert main(["train", path, "--steps", "1", "--in-memory"]) == 2
    assert "is an MLP model; --in-memory applies to dense models only" in capsys.readouterr().err


@needs_mnist
def test_a_stopped_run_prints_the_command_that_finishes_it(tmp_path, monkeypatch, capsys):
    """issue 19 item 5: the hint said "run the same command", which with --steps overshoots. The stop line
    now prints a command with --until-step, and running it ends exactly at the planned step."""
    from deepnet.training.signals import Interrupted

    path = str(tmp_path / "m.h5")
    line = ["train", path, "--layers", "30", "--steps", "6", "--test-samples", "0", "--quiet"]
    assert main(line) == 0

    def stop_at(step):  # a Ctrl-C as step 9 begins: the run of --steps 6 from step 6 plans to end at 12
        real = DeepNet.train_step

        def train_step(self, *args, **kwargs):
            if self.step == step:
                raise Interrupted(f"stopped after step {step} of 12; {path} holds step {step}",
                                  held_step=step, until_step=12)
            return real(self, *args, **kwargs)
        return train_step

    from deepnet.nn.network import DeepNet
    monkeypatch.setattr(DeepNet, "train_step", stop_at(8))
    capsys.readouterr()
    assert main(line) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"to finish the run: deepnet train {path} --layers 30 --test-samples 0 --quiet "
                        "--until-step 12"), err
    monkeypatch.undo()
    finish = err.split("to finish the run: deepnet ")[1].split()
    assert main(finish + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 12
