"""The command line against malformed input and signals (issue 18: items 6, 9, 10, 11, 12).

Every case is derived from the commands' signatures where it can be (every switch, every number flag),
so a flag added later is covered without editing this file. All in-process and deterministic: the
signals are sent by the process to itself at a chosen point of the work.
"""

from __future__ import annotations

import importlib.abc
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import deepnet
from deepnet import interrupts
from deepnet.cli import DeepnetCLI, main, prepare_args
from deepnet.errors import ConfigError, Terminated
from deepnet.formats import create, h5io
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")


def commands() -> dict[str, inspect.Signature]:
    """Every command's name and the signature its flags come from (aliases once)."""
    out, seen = {}, set()
    for name, value in vars(DeepnetCLI).items():
        if isinstance(value, staticmethod) and value.__func__ not in seen:
            seen.add(value.__func__)
            out[name.replace("_", "-")] = inspect.signature(value.__func__)
    return out


def flags_of(kind: str) -> list[tuple[str, str]]:
    """(command, --flag) for every flag whose annotation names ``kind``."""
    return [(command, "--" + name.replace("_", "-")) for command, sig in commands().items()
            for name, p in sig.parameters.items() if kind in str(p.annotation).replace("<class '", "")]


def required_args(command: str) -> list[str]:
    """Placeholders for a command's required positional arguments."""
    return ["x.h5" for p in commands()[command].parameters.values() if p.default is inspect.Parameter.empty]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepnet: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# item 9: switches


@pytest.mark.parametrize("command,flag", flags_of("bool"))
@pytest.mark.parametrize("value", ["maybe", "2", "sometimes", ""])
def test_every_switch_refuses_a_value_that_is_not_true_or_false(command, flag, value, tmp_path, monkeypatch,
                                                                 capsys):
    """issue 18 item 9: `--in-memory=maybe`, `--json=sometimes`, `--resume-torn=2` are refused with one line,
    for every bool-typed flag of every command, before anything runs."""
    monkeypatch.chdir(tmp_path)
    assert main([command, *required_args(command), f"{flag}={value}"]) == 2
    assert f"{flag} is a switch" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_switch_never_takes_the_next_argument_and_reads_true_false():
    """issue 18 item 12: `check --json M` checks M (fire made --json swallow M); item 9: =true/=false/--noX."""
    assert prepare_args(["check", "--json", "m.h5"]) == ["check", "--json=True", "--model='m.h5'"]
    assert prepare_args(["info", "--json", "m.h5"]) == ["info", "--json=True", "--model='m.h5'"]
    assert prepare_args(["train", "--in-memory=FALSE", "--noresume-torn"]) == [
        "train", "--in_memory=False", "--resume_torn=False"]
    with pytest.raises(ConfigError, match="--noin-memory takes no value"):
        prepare_args(["train", "--noin-memory=true"])


@needs_mnist
def test_check_and_info_json_before_the_model(tmp_path, capsys):
    """issue 18 item 12: `check --json M` and `info --json M` work."""
    path = tmp_path / "m.h5"
    assert main(["init", str(path), "--layers", "10"]) == 0
    capsys.readouterr()
    for command in ("check", "info"):
        assert main([command, "--json", str(path)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[0])


def test_a_flag_given_twice_counts_once_the_last_time():
    assert prepare_args(["train", "--steps", "1", "--json", "--steps=2", "--nojson"]) == [
        "train", "--steps=2", "--json=False"]


def test_text_flags_reach_the_command_as_typed():
    """A neighbour of item 9: fire reads `--model 1e3` as the number 1000.0 and `--activation [1]` as a list."""
    assert prepare_args(["train", "--model", "1e3", "--activation=[1]"]) == [
        "train", "--model='1e3'", "--activation='[1]'"]


# ---------------------------------------------------------------------------------------------------
# item 11: numbers


@pytest.mark.parametrize("command,flag", flags_of("float"))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "abc"])
def test_every_number_flag_refuses_nan_inf_and_words(command, flag, value, tmp_path, monkeypatch, capsys):
    """issue 18 item 11: `speedrun --target-acc nan` ended in a TypeError traceback; every float flag of
    every command refuses nan, inf and words with one line, through flags.finite_number."""
    monkeypatch.chdir(tmp_path)
    assert main([command, *required_args(command), f"{flag}={value}"]) == 2
    assert f"{flag} must be a finite number" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,flag", flags_of("int"))
def test_every_integer_flag_refuses_fractions_and_words(command, flag, tmp_path, monkeypatch, capsys):
    """A neighbour of issue 18 item 11: an integer flag given 1.5 or a word gets one line naming it."""
    monkeypatch.chdir(tmp_path)
    for value in ("1.5", "abc"):
        assert main([command, *required_args(command), f"{flag}={value}"]) == 2
        assert f"{flag} must be an integer" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@needs_mnist
def test_speedrun_target_acc_out_of_range_is_one_line(tmp_path, capsys):
    """issue 18 item 11, through the API's own check (flags.number_in)."""
    import deepnet

    with pytest.raises(ConfigError, match=r"--target-acc must be a finite number, got nan"):
        deepnet.speedrun(target_acc=float("nan"), layers=10, workdir=tmp_path)
    assert main(["speedrun", "--target-acc", "1.5", "--layers", "10", "--workdir", str(tmp_path)]) == 2
    assert "--target-acc must be in (0, 1], got 1.5" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# item 12: one line for every malformed command line


@pytest.mark.parametrize("args,expected", [
    (["nosuch"], "deepnet: error: unknown command 'nosuch' (commands: activations, bench, check, "),
    (["check"], "deepnet: error: check needs a model file (deepnet check MODEL)"),
    (["info"], "deepnet: error: info needs a model file (deepnet info MODEL)"),
    (["check", "a.h5", "b.h5"], "deepnet: error: deepnet check: unexpected argument 'b.h5'"),
    (["--json"], "deepnet: error: a command comes first, got '--json'"),
    (["train", "-in-memory"], "deepnet: error: deepnet train: flags take two hyphens: '-in-memory'"),
    (["train", "--steps"], "deepnet: error: deepnet train: --steps needs a value"),
    (["train", "--model", "--steps", "3"], "deepnet: error: deepnet train: --model needs a value"),
    (["train", "--model="], "deepnet: error: --model needs a value, got ''"),
    (["train", "--nosteps"], "deepnet: error: deepnet train has no flag --nosteps"),
    (["activations", "nope"], "deepnet: error: deepnet activations: unknown action 'nope'"),
])
def test_a_malformed_command_line_is_one_line(args, expected, tmp_path, monkeypatch, capsys):
    """issue 18 item 12: an unknown command and `check` without a model printed fire's multi-line usage."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert one_error_line(capsys).startswith(expected)
    assert list(tmp_path.iterdir()) == []


def test_a_multi_line_error_message_prints_as_one_line(monkeypatch, capsys):
    """issue 18 item 12 (train-mlp on a full disk printed HDF5's message over two lines): any error's
    message is printed on one line."""
    import deepnet.api

    def fails(model):
        raise ConfigError("first line\n  second line")

    monkeypatch.setattr(deepnet.api.check, "__code__", fails.__code__)
    assert main(["check", "m.h5"]) == 2
    assert one_error_line(capsys) == "deepnet: error: first line second line"


# ---------------------------------------------------------------------------------------------------
# item 10: a refused run creates nothing


@needs_mnist
@pytest.mark.parametrize("flags,message", [
    (["--holdout", "60000"], "--holdout must be an integer in 0..59999, got 60000"),
    (["--schedule", "linear", "--decay-steps", "-3"], "--decay-steps must be an integer >= 1, got -3"),
    (["--holdout", "100"], "--holdout N needs --eval-every K"),
    (["--eval-every", "5"], "--eval-every evaluates on the held-out images"),
    (["--holdout", "59000", "--eval-every", "1", "--train-limit", "2000"], "--train-limit must be in 1..1000"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
])
def test_a_refused_training_run_creates_no_model_file(flags, message, tmp_path, capsys):
    """issue 18 item 10: `train --model new.h5 --layers 1000 --holdout 60000` and `--schedule linear
    --decay-steps -3` exited 2 but left a new file: the run is planned against the data first."""
    path = tmp_path / "new.h5"
    assert main(["train", "--model", str(path), "--layers", "100", "--steps", "1", "--test-samples", "0",
                 *flags]) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@needs_mnist
@pytest.mark.parametrize("args,message", [
    (["--activation", "nope"], "activation 'nope' is not registered"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--holdout", "60000"], "--holdout must be < 60000"),
    (["--workdir", "{tmp}/missing"], "--workdir {tmp}/missing is not a directory"),
])
def test_a_refused_speedrun_creates_nothing(args, message, tmp_path, capsys):
    """A neighbour of issue 18 item 10: speedrun checks every setting before the data and its model."""
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["speedrun", "--layers", "10", "--model", str(tmp_path / "s.h5"), *args]) == 2
    assert message.format(tmp=tmp_path) in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_a_missing_workdir(tmp_path, capsys):
    """A neighbour of issue 18 item 10: bench's temporary directory went to a traceback."""
    assert main(["bench", "--layers", "10", "--workdir", str(tmp_path / "missing")]) == 2
    assert "--workdir" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# item 6: signals


def _at_second_block(monkeypatch, action, *, slow_after=False):
    """Run ``action`` when init writes its second block of core weights (``slow_after``: and let the work
    go on slowly after it, until the stop lands; init finishing first fails the test)."""
    monkeypatch.setattr(create, "default_storage_chunk_layers", lambda layers, width: 1000)
    real = h5io.write_block
    calls = [0]

    def write_block(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            action()
        if slow_after and calls[0] >= 2:
            time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(h5io, "write_block", write_block)


@pytest.mark.parametrize("signum,status,word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_init_stops_it_and_leaves_no_temporary(signum, status, word, tmp_path, monkeypatch,
                                                               capsys):
    """issue 18 item 6: SIGTERM during `init` left a `.big.h5.tmp-*`; SIGINT exits 130, SIGTERM 143 (128 +
    the signal), with one line and nothing left behind."""
    _at_second_block(monkeypatch, lambda: os.kill(os.getpid(), signum))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["init", str(tmp_path / "big.h5"), "--layers", "200000"]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"deepnet: {word}"
    assert list(tmp_path.iterdir()) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # an in-process call


def test_a_stop_swallowed_by_a_finaliser_is_raised_again(tmp_path, monkeypatch, capsys):
    """issue 18 item 6: SIGINT during a long init was ignored, "once with a KeyboardInterrupt traceback from a
    weakref callback": the handler's exception landed in a finaliser, where Python drops it."""

    class Finaliser:
        def __del__(self):
            raise KeyboardInterrupt  # as the signal handler does when the signal arrives in here

    _at_second_block(monkeypatch, Finaliser, slow_after=True)
    assert main(["init", str(tmp_path / "big.h5"), "--layers", "200000"]) == 130
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and err.strip().splitlines()[-1] == "deepnet: interrupted"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc,status,line", [(KeyboardInterrupt(), 130, "deepnet: interrupted"),
                                             (Terminated(), 143, "deepnet: terminated")])
def test_a_signal_while_the_command_line_is_still_loading(exc, status, line, monkeypatch, capsys):
    """issue 18 item 6: SIGINT 0.3 s after launch (during the imports) gave a traceback and status -2."""
    from deepnet import __main__ as entry

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "deepnet.cli":
                raise exc

    monkeypatch.delitem(sys.modules, "deepnet.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert entry.main(["info", "m.h5"]) == status
    assert capsys.readouterr().err == line + "\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigint_stops_a_command_that_inherited_it_ignored():
    """issue 18 item 6: a shell script's background job inherits SIGINT ignored; `kill -INT` must stop it
    as it stops training."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = interrupts.install()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        restore()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_exit_status_is_128_plus_the_signal():
    """issue 18 item 6: one convention for every command, training's Interrupted included."""
    from deepnet.training.signals import Interrupted

    assert interrupts.exit_status(KeyboardInterrupt()) == 130
    assert interrupts.exit_status(Terminated()) == 143
    assert interrupts.exit_status(Interrupted("stopped", signal.SIGTERM)) == 143
    assert interrupts.stop_line(Interrupted("stopped after step 3", signal.SIGTERM)) == \
        "deepnet: terminated: stopped after step 3"


def test_a_closed_output_pipe_stops_quietly():
    """A neighbour of issue 18 item 12: `deepnet activations --json | head -1` ended in a BrokenPipeError
    traceback; it now stops as a writer killed by SIGPIPE does (status 141), saying nothing."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(deepnet.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "deepnet", "activations", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the command has written anything: it takes longer than this to start
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
