"""The real `deepnet` console command, run as a subprocess (`python -m deepnet` and the installed script).

Covers the commands, the original experiment's aliases and flag names, the JSON output, --help, and
that every bad value is refused with exit status != 0, one line on stderr starting "deepnet: error:",
no traceback (unless --debug), and no model file created or modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepnet
from helpers import MNIST_DIR, have_mnist, read_weights, train_tiny

pytestmark = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")

# The script that belongs to this interpreter's environment first, then whatever PATH finds.
SCRIPT = shutil.which("deepnet", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
ENTRY_POINTS = {
    "module": [sys.executable, "-m", "deepnet"],
    "script": [SCRIPT] if SCRIPT else None,
}

TINY = ["--layers", "20", "--width", "4"]
REPORT_FIELDS = {"event", "step", "loss", "batch_acc", "seconds_per_step", "layer_samples_per_s", "eta_seconds"}
FINAL_FIELDS = {"event", "model", "steps", "step", "loss", "batch_acc", "seconds", "seconds_per_step",
                "layer_samples_per_s"}
TEST_FIELDS = {"test_loss", "test_acc", "test_samples"}
#: The final result's held-out best and early stop (None and False without --holdout).
BEST_FIELDS = {"best_heldout_acc", "best_heldout_step", "best_model", "stopped_early"}
# The original experiment's flag names (train-dense / eval-dense).
ORIGINAL_FLAGS = ["--layers", "--width", "--activation", "--batch", "--steps", "--chunk-layers", "--layer-lr",
                  "--head-lr", "--alpha", "--seed", "--train-limit", "--report-every", "--in-memory",
                  "--data-dir", "--samples", "--model"]


def deepnet_cmd(entry: str, *args: str, cwd: Path, env_data: bool = True, timeout: float = 300):
    argv = ENTRY_POINTS[entry]
    if argv is None:
        pytest.skip("the deepnet script is not installed")
    env = dict(os.environ)
    env.pop("DEEPNET_DATA", None)
    if env_data:
        env["DEEPNET_DATA"] = str(MNIST_DIR)
    return subprocess.run([*argv, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # every line parses on its own


def check_finite_number(value, what):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what} = {value!r}"
    assert np.isfinite(value), f"{what} = {value!r}"


# ---------------------------------------------------------------------------------------------------
# the commands, through both entry points


@pytest.mark.parametrize("entry", ["module", "script"])
def test_init_train_eval_info_activations(tmp_path, entry):
    ok(deepnet_cmd(entry, "init", "m.h5", *TINY, "--activation", "tanh", "--seed", "1", cwd=tmp_path))
    with deepnet.ModelFile.open(tmp_path / "m.h5") as f:
        assert (f.layers, f.width, f.activation, f.seed, f.step) == (20, 4, "tanh", 1, 0)

    proc = ok(deepnet_cmd(entry, "train", "m.h5", "--steps", "5", "--report-every", "2", "--batch", "8",
                          "--test-samples", "100", "--json", cwd=tmp_path))
    events = json_lines(proc.stdout)
    assert [e["event"] for e in events] == ["report", "report", "report", "final"]
    assert [e["step"] for e in events[:3]] == [2, 4, 5]
    for e in events[:3]:
        assert set(e) == REPORT_FIELDS
        for key in REPORT_FIELDS - {"event", "step"}:
            check_finite_number(e[key], key)
        assert 0 <= e["batch_acc"] <= 1 and e["loss"] > 0 and e["seconds_per_step"] > 0
    final = events[-1]
    assert set(final) == FINAL_FIELDS | TEST_FIELDS | BEST_FIELDS
    assert [final[k] for k in sorted(BEST_FIELDS)] == [None, None, None, False]
    assert final["steps"] == 5 and final["step"] == 5 and final["model"] == "m.h5"
    assert final["loss"] == events[-2]["loss"] and final["batch_acc"] == events[-2]["batch_acc"]
    for key in FINAL_FIELDS - {"event", "model", "steps", "step"}:
        check_finite_number(final[key], key)
    assert final["seconds"] > 0 and final["layer_samples_per_s"] > 0
    assert final["test_samples"] == 100 and 0 <= final["test_acc"] <= 1

    proc = ok(deepnet_cmd(entry, "eval", "m.h5", "--samples", "300", "--json", cwd=tmp_path))
    (ev,) = json_lines(proc.stdout)
    assert ev["event"] == "eval" and ev["samples"] == 300 and ev["step"] == 5
    assert 0 <= ev["accuracy"] <= 1 and np.isfinite(ev["loss"]) and ev["seconds"] > 0

    proc = ok(deepnet_cmd(entry, "info", "m.h5", "--json", cwd=tmp_path))
    (info,) = json_lines(proc.stdout)
    assert (info["layers"], info["width"], info["activation"], info["step"], info["log_rows"]) == (20, 4, "tanh", 5, 5)
    assert info["last_log"]["step"] == 5

    acts = json_lines(ok(deepnet_cmd(entry, "activations", "--json", cwd=tmp_path)).stdout)
    assert {"tanh", "softsign", "relu"} <= {a["name"] for a in acts}
    assert all(set(a) == {"name", "origin", "compiled", "description"} for a in acts)


def test_text_output(tmp_path):
    ok(deepnet_cmd("module", "init", "m.h5", *TINY, cwd=tmp_path))
    # A table of reports, then the final figures.
    proc = ok(deepnet_cmd("module", "train", "m.h5", "--steps", "3", "--report-every", "2", cwd=tmp_path))
    assert "layer-samples/s" in proc.stdout and "now at step 3" in proc.stdout and "accuracy" in proc.stdout
    proc = ok(deepnet_cmd("module", "eval", "m.h5", "--samples", "300", cwd=tmp_path))
    assert "accuracy" in proc.stdout and "/300" in proc.stdout
    proc = ok(deepnet_cmd("module", "info", "m.h5", cwd=tmp_path))
    assert "layers" in proc.stdout and "softsign" in proc.stdout
    proc = ok(deepnet_cmd("module", "activations", cwd=tmp_path))
    for name in ("tanh", "softsign", "relu"):
        assert name in proc.stdout
    # bench: seconds per step, the warm-up apart, and the threads each timed step's passes ran on
    proc = ok(deepnet_cmd("module", "bench", "--layers", "3000", "--steps", "2", "--workdir", str(tmp_path),
                          cwd=tmp_path))
    assert "median of 2" in proc.stdout and "warm-up" in proc.stdout
    assert re.search(r"threads +forward/backward per step: [12]/[12] [12]/[12]\n", proc.stdout), proc.stdout
    # which compiled build ran: the fastest this CPU runs
    from deepnet.kernels.loader import build_label, builtin_module
    assert re.search(rf"kernels +{re.escape(build_label(builtin_module()))}\n", proc.stdout), proc.stdout
    # how much CPU time the hypervisor took meanwhile (not measurable when the steps fit in a clock tick)
    assert re.search(r"cpu stolen +(\d+\.\d% of the machine's CPU time during the timed steps|not measured)",
                     proc.stdout), proc.stdout
    # each CPU's time at the backward's loops, around the timed steps (one CPU: not measured)
    assert re.search(r"vCPU probe +(ns a layer of a one-thread backward on each CPU: before the timed steps "
                     r"[0-9.]+( / [0-9.]+)+, after [0-9.]+( / [0-9.]+)+ |not measured)", proc.stdout), proc.stdout


def test_aliases_take_the_original_flag_names(tmp_path):
    flags = ["--layers", "20", "--width", "4", "--activation", "softsign", "--batch", "8", "--steps", "5",
             "--chunk-layers", "7", "--layer-lr", "0.07", "--head-lr", "0.03", "--alpha", "0.2", "--seed", "3",
             "--train-limit", "1000", "--report-every", "2", "--in-memory", "--data-dir", str(MNIST_DIR),
             "--json"]
    # Without $DEEPNET_DATA: --data-dir alone must find MNIST.
    proc = ok(deepnet_cmd("script", "train-dense", "--model", "dense.h5", *flags, cwd=tmp_path, env_data=False))
    final = json_lines(proc.stdout)[-1]
    assert final["event"] == "final" and final["steps"] == 5
    with deepnet.ModelFile.open(tmp_path / "dense.h5") as f:
        assert (f.layers, f.width, f.activation, f.seed, f.step) == (20, 4, "softsign", 3, 5)
        assert f.alpha == pytest.approx(0.2)

    # `train` with the same flags gives the same file, bit for bit (and --test-samples 0 skips the test).
    ok(deepnet_cmd("module", "train", "--model", "plain.h5", *flags, "--test-samples", "0", cwd=tmp_path,
                   env_data=False))
    heads_a, core_a = read_weights(tmp_path / "dense.h5")
    heads_b, core_b = read_weights(tmp_path / "plain.h5")
    assert np.array_equal(core_a, core_b)
    assert all(np.array_equal(heads_a[k], heads_b[k]) for k in heads_a)

    proc = ok(deepnet_cmd("module", "eval-dense", "--model", "dense.h5", "--samples", "100", "--batch", "33",
                          "--chunk-layers", "6", "--in-memory", "--data-dir", str(MNIST_DIR), "--json",
                          cwd=tmp_path, env_data=False))
    (ev,) = json_lines(proc.stdout)
    assert ev["event"] == "eval" and ev["samples"] == 100 and ev["step"] == 5


def _help_text(proc) -> str:
    # fire prints help on stderr; either stream is fine, but it must not be an error.
    ok(proc)
    return proc.stdout + proc.stderr


def _flags_in(text: str) -> set[str]:
    # fire spells flags with underscores in a command's help (--layer_lr); both spellings are accepted.
    return {flag.replace("_", "-") for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text)}


def test_help_mentions_every_flag(tmp_path):
    top = _help_text(deepnet_cmd("module", "--help", cwd=tmp_path))
    for command in ("init", "train", "train-dense", "eval", "eval-dense", "info", "data", "activations"):
        assert command in top, command
    assert {"--json", "--debug", "--help", "--version", "--quiet"} <= _flags_in(top)

    train_flags = _flags_in(_help_text(deepnet_cmd("script", "train", "--help", cwd=tmp_path)))
    expected = set(ORIGINAL_FLAGS) | {"--test-samples", "--eval-samples", "--json", "--quiet", "--progress"}
    assert expected <= train_flags, expected - train_flags


def _main_help(capsys, *args) -> str:
    """--help through the console command's main() in this process (same code, no interpreter start-up)."""
    from deepnet.cli import main

    assert main([*args, "--help"]) == 0
    out = capsys.readouterr()
    return out.out + out.err


def test_help_of_each_command_mentions_its_flags(capsys):
    expected = set(ORIGINAL_FLAGS) | {"--test-samples", "--eval-samples", "--json"}
    dense_flags = _flags_in(_main_help(capsys, "train-dense"))
    assert expected <= dense_flags, expected - dense_flags
    for command in ("eval", "eval-dense"):
        assert {"--model", "--test-samples", "--samples", "--batch", "--chunk-layers", "--in-memory", "--data-dir", "--json"} \
            <= _flags_in(_main_help(capsys, command)), command
    init_help = _main_help(capsys, "init")
    assert "MODEL" in init_help  # init's model is positional (--model works too)
    assert {"--layers", "--width", "--activation", "--alpha", "--seed", "--overwrite"} <= _flags_in(init_help)
    assert "--json" in _flags_in(_main_help(capsys, "info"))
    assert "--dest" in _flags_in(_main_help(capsys, "data"))


# ---------------------------------------------------------------------------------------------------
# refused commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding one trained tiny model, existing.h5 (width 4, 20 layers, step 2)."""
    d = tmp_path_factory.mktemp("cli")
    deepnet.init(d / "existing.h5", layers=20, width=4, activation="softsign", progress=False)
    train_tiny(d / "existing.h5", 2)
    (d / "notes.txt").write_text("not a model\n")
    return d


def snapshot(directory: Path) -> dict[str, str]:
    """Every file in the directory (hidden temporaries too) and the sha256 of its content.

    Content, not mtime: checking a flag against an existing file opens it for writing (as training
    would), which may touch its mtime without changing a byte.
    """
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


# Refused through the real command (a new interpreter each time).
BAD = {
    "layers-0": ["train", "new.h5", "--layers", "0", "--width", "4"],
    "layers-negative": ["train", "new.h5", "--layers", "-3"],
    "width-0": ["train", "new.h5", "--layers", "20", "--width", "0"],
    "batch-0": ["train", "new.h5", *TINY, "--batch", "0"],
    "steps-0": ["train", "new.h5", *TINY, "--steps", "0"],
    "chunk-layers-0": ["train", "new.h5", *TINY, "--chunk-layers", "0"],
    "unknown-activation": ["train", "new.h5", *TINY, "--activation", "swish9"],
    "eval-missing-model": ["eval", "missing.h5"],
    "width-disagrees": ["train", "existing.h5", "--width", "3", "--steps", "1"],
    "train-limit-0": ["train", "new.h5", *TINY, "--train-limit", "0"],
    "train-limit-too-big": ["train", "new.h5", *TINY, "--train-limit", "60001"],
    "samples-0": ["eval", "existing.h5", "--samples", "0"],
    "layer-lr-negative": ["train", "new.h5", *TINY, "--layer-lr", "-0.01"],
    # A mistyped flag must not train with the defaults first (fire would only complain afterwards).
    "unknown-flag": ["train", "new.h5", *TINY, "--stepz", "5"],
}
# The installed script goes through the same main(); a few cases through it are enough.
SCRIPT_CASES = ["layers-negative", "eval-missing-model", "samples-0"]

# More refusals, through the console command's main() in-process (same code path, faster).
BAD_IN_PROCESS = {
    "layers-not-int": ["train", "new.h5", "--layers", "2.5"],
    "width-negative": ["init", "new.h5", "--width", "-1"],
    "info-missing-model": ["info", "missing.h5"],
    "layers-disagree": ["train", "existing.h5", "--layers", "21", "--steps", "1"],
    "activation-disagrees": ["train", "existing.h5", "--activation", "tanh", "--steps", "1"],
    "alpha-disagrees": ["train", "existing.h5", "--alpha", "0.5", "--steps", "1"],
    "samples-too-many": ["eval", "existing.h5", "--samples", "10001"],
    "eval-batch-0": ["eval", "existing.h5", "--batch", "0"],
    "head-lr-negative": ["train", "existing.h5", "--head-lr", "-1", "--steps", "1"],
    "layer-lr-nan": ["train", "existing.h5", "--layer-lr", "nan", "--steps", "1"],
    "report-every-0": ["train", "existing.h5", "--report-every", "0"],
    "test-samples-negative": ["train", "existing.h5", "--test-samples", "-1"],
    "seed-negative": ["init", "new.h5", *TINY, "--seed", "-1"],
    "init-layers-0": ["init", "new.h5", "--layers", "0"],
    "init-unknown-activation": ["init", "new.h5", "--activation", "nope"],
    "init-existing": ["init", "existing.h5", *TINY],
    "alias-layers-negative": ["train-dense", "--model", "new.h5", "--layers", "-3", "--width", "4"],
    "alias-samples-0": ["eval-dense", "--model", "existing.h5", "--samples", "0"],
    "unknown-flag-existing": ["train", "existing.h5", "--step", "1"],
    "unknown-flag-eval": ["eval", "existing.h5", "--sample", "5"],
    "not-a-model": ["eval", "notes.txt"],
    "bench-threads-negative": ["bench", "--layers", "100", "--threads", "-1"],
    "bench-threads-not-int": ["bench", "--layers", "100", "--threads", "1.5"],
}


def assert_refused(returncode, stderr, workdir, before, case):
    assert returncode != 0, f"{case} was accepted"
    assert returncode == 2, f"{case}: exit status {returncode}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"{case}: stderr is not one line:\n{stderr}"
    assert lines[0].startswith("deepnet: error: "), lines[0]
    assert snapshot(workdir) == before, f"{case}: a refused command created or modified a file"


@pytest.mark.parametrize("entry, case", [("module", c) for c in BAD] + [("script", c) for c in SCRIPT_CASES])
def test_bad_values_are_refused_in_one_line(workdir, entry, case):
    before = snapshot(workdir)
    proc = deepnet_cmd(entry, *BAD[case], cwd=workdir)
    assert_refused(proc.returncode, proc.stderr, workdir, before, case)


@pytest.mark.parametrize("case", list(BAD_IN_PROCESS))
def test_more_bad_values_are_refused_in_one_line(workdir, case, capsys, monkeypatch, mnist_dir):
    from deepnet.cli import main

    monkeypatch.chdir(workdir)
    before = snapshot(workdir)
    code = main(BAD_IN_PROCESS[case])
    assert_refused(code, capsys.readouterr().err, workdir, before, case)


def test_debug_shows_the_traceback(workdir):
    before = snapshot(workdir)
    proc = deepnet_cmd("module", "train", "new.h5", "--layers", "0", "--debug", cwd=workdir)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError" in proc.stderr and "--layers must be > 0" in proc.stderr
    assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------------
# the command line is derived from the API


def test_every_command_takes_its_api_functions_flags():
    """A command's flags are its API function's parameters (bar progress/on_report, which it sets), plus
    the command line's own: --json, --quiet, and --progress where the function can show progress."""
    import inspect

    from deepnet import api
    from deepnet.cli import NOT_FLAGS, DeepnetCLI

    pairs = {"init": api.init, "train": api.train, "train_dense": api.train, "eval": api.evaluate,
             "eval_dense": api.evaluate, "speedrun": api.speedrun, "info": api.info, "check": api.check,
             "bench": api.bench, "train_mlp": api.train_mlp, "eval_mlp": api.evaluate_mlp,
             "import_raw": api.import_raw, "export_raw": api.export_raw, "plot": api.plot, "data": api.fetch_data}
    for name, fn in pairs.items():
        command = getattr(DeepnetCLI, name)
        params = inspect.signature(fn).parameters
        want = [p for p in params if p not in NOT_FLAGS] + ["json", "quiet"] + ["progress"] * ("progress" in params)
        assert list(inspect.signature(command).parameters) == want, name
        assert command.__doc__ == fn.__doc__, name
        assert "json" not in params and "quiet" not in params, name
    assert list(inspect.signature(DeepnetCLI.activations.check).parameters) == ["name", "json", "quiet"]


def test_a_training_flag_lives_in_the_api_function_and_the_option_object_only():
    import dataclasses
    import inspect

    from deepnet import api
    from deepnet.training.options import TrainOptions

    params = set(inspect.signature(api.train).parameters) - {"json", "progress", "on_report"}
    assert params == {f.name for f in dataclasses.fields(TrainOptions)}


def test_api_returns_results_and_prints_nothing(tmp_path, mnist_dir, capsys):
    rows = []
    final = deepnet.train(tmp_path / "m.h5", steps=4, layers=20, width=4, report_every=2, test_samples=50,
                          on_report=rows.append)
    figures = deepnet.evaluate(tmp_path / "m.h5", test_samples=50)
    info = deepnet.info(tmp_path / "m.h5")
    report = deepnet.check(tmp_path / "m.h5")
    acts = deepnet.list_activations()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [r["step"] for r in rows] == [2, 4] and set(rows[0]) == REPORT_FIELDS
    assert final["event"] == "final" and final["step"] == 4 and figures["step"] == 4 and info["step"] == 4
    assert report.healthy and "softsign" in [a["name"] for a in acts["activations"]]


def test_activations_is_a_command_group(tmp_path, capsys):
    from deepnet.cli import main

    assert main(["activations", "list"]) == 0
    listed = capsys.readouterr().out
    assert main(["activations"]) == 0
    assert capsys.readouterr().out == listed and "softsign" in listed
    assert main(["activations", "compile", "tanh", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["name"] == "tanh"
    assert main(["activations", "check", "softsign", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    for args, message in ((["activations", "frob"], "unknown action 'frob'"),
                          (["activations", "check"], "needs the activation's name"),
                          (["activations", "check", "tanh", "--bogus"], "has no flag --bogus")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("deepnet: error:") and message in err[0], err
