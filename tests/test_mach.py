"""Mach sections (deepnet.mach) in one process: the pieces against independent float64 references, the
lock-step schedule against the exact step bit for bit, the bookkeeping of late gradients, the settings'
refusals, the saved state and `deepnet eval --section`. The runs under mpiexec are in test_mach_mpi.py.
"""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

import deepnet
from deepnet.errors import ConfigError
from deepnet.formats import layout, shards
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.mach_state import MachState, SectionState, read_mach, write_mach
from deepnet.kernels.loader import kernels_for
from deepnet.mach.evaluate import evaluate_section
from deepnet.mach.section import MachSection, lockstep, queue_links
from deepnet.mach.settings import MachSettings
from deepnet.nn import heads as _heads
from deepnet.nn.distill import DistilledInput
from deepnet.nn.network import DeepNet
from reference import assert_close, assert_update_close, core_backward, core_forward, softmax_xent

LAYERS, WIDTH, BATCH, N = 120, 4, 16, 300
ALPHA = 0.3  # large enough that the core's arithmetic matters in the comparisons


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.random((N, 784), dtype=np.float32), rng.integers(0, 10, N)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mach") / "m.h5"
    deepnet.init(path, layers=LAYERS, width=WIDTH, activation="softsign", seed=3)
    with ModelFile.open(path) as f:
        return path, f.read_core(), f.read_heads(), f.alpha


def _heads_of(k: int, count: int, heads: dict, seed: int = 0) -> dict:
    out = {}
    if k == 0:
        out.update({key: v.copy() for key, v in heads.items() if key.startswith("input")})
    if k == count - 1:
        out.update({key: v.copy() for key, v in heads.items() if key.startswith("output")})
    else:
        rng = np.random.default_rng([seed, k])
        out.update({"output_weight": rng.uniform(-0.5, 0.5, (WIDTH, 10)).astype(np.float32),
                    "output_bias": rng.uniform(-0.1, 0.1, 10).astype(np.float32)})
    return out


def _sections(core, heads, alpha, data, settings, count, *, draw_seed=11, chunk=37):
    x, y = data
    links = queue_links(count)
    out = []
    for k, rows in enumerate(np.array_split(np.arange(core.shape[0]), count)):
        distill = None if k == 0 else DistilledInput.new(heads, 8, np.random.default_rng(k))
        out.append(MachSection(k, count, core[rows[0]:rows[-1] + 1], kernels_for("softsign", WIDTH), WIDTH, alpha,
                               chunk, BATCH, settings, _heads_of(k, count, heads), distill,
                               np.random.default_rng(draw_seed), x, y, links[k]))
    return out


# ----------------------------------------------------------------------------- the pieces, in float64


def test_a_new_distilled_model_predicts_the_input_head_exactly(model, data):
    _, _, heads, _ = model
    d = DistilledInput.new(heads, 16, np.random.default_rng(0))
    x = data[0][:32]
    assert np.array_equal(d.predict(x), _heads.input_head(heads, x))


def test_the_distillation_step_matches_a_float64_reference(data):
    rng = np.random.default_rng(1)
    x = data[0][:BATCH]
    p = {"input_weight": rng.normal(0, 0.05, (784, WIDTH)), "input_bias": rng.normal(0, 0.1, WIDTH),
         "w1": rng.normal(0, 0.05, (784, 8)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.3, (8, WIDTH)),
         "b2": rng.normal(0, 0.1, WIDTH)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    target = rng.normal(0, 0.5, (BATCH, WIDTH)).astype(np.float32)
    d = DistilledInput({k: v.copy() for k, v in p.items()})
    lr = 0.1
    loss = d.step(x, target, lr)

    q = {k: v.astype(np.float64) for k, v in p.items()}
    x64, t64 = x.astype(np.float64), target.astype(np.float64)
    tanh = np.tanh(x64 @ q["input_weight"] + q["input_bias"])
    pre = x64 @ q["w1"] + q["b1"]
    hid = np.maximum(pre, 0)
    out = tanh + hid @ q["w2"] + q["b2"]
    diff = out - t64
    want_loss = 0.5 * np.sum(diff ** 2) / BATCH
    dout = diff / BATCH
    dpre_tanh = dout * (1 - tanh ** 2)
    dhid = (dout @ q["w2"].T) * (pre > 0)
    grads = {"input_weight": x64.T @ dpre_tanh, "input_bias": dpre_tanh.sum(0), "w1": x64.T @ dhid,
             "b1": dhid.sum(0), "w2": hid.T @ dout, "b2": dout.sum(0)}
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for key, value in d.params().items():
        assert_update_close(value, p[key], q[key] - lr * grads[key], what=key)


def _section_pair(model, data, settings):
    """Section 1 of 3 (neither end), fed by hand through its links."""
    _, core, heads, _ = model
    rows = core[:40].copy()
    x, y = data
    links = queue_links(3)
    distill = DistilledInput.new(heads, 8, np.random.default_rng(1))
    s = MachSection(1, 3, rows, kernels_for("softsign", WIDTH), WIDTH, ALPHA, 17, BATCH, settings,
                    _heads_of(1, 3, heads), distill, np.random.default_rng(5), x, y, links[1])
    return s, links


def _input(i: int, data) -> dict:
    rng = np.random.default_rng(100 + i)
    idx = rng.integers(0, N, BATCH)
    return {"id": i, "idx": idx, "h": rng.uniform(-0.8, 0.8, (WIDTH, BATCH)).astype(np.float32)}


def _reference_section_step(rows, head, columns, tops, lr_layer, lr_head, labels=None):
    """float64: forward [columns] through rows, backward with tops (both (batch, w) per column set);
    the own head's loss on the first set; returns (new rows, g at the input per set, new head)."""
    h_in = np.concatenate([c.T for c in columns]).astype(np.float64)       # (n, w)
    h_out, trace = core_forward(h_in, rows, ALPHA, "softsign")
    top = None
    new_head = None
    if labels is not None:
        hb = h_out[:BATCH]
        logits = hb @ head["output_weight"].astype(np.float64) + head["output_bias"]
        _, dlogits = softmax_xent(logits, labels)
        g_local = dlogits @ head["output_weight"].astype(np.float64).T
        new_head = {"output_weight": head["output_weight"] - lr_head * (hb.T @ dlogits),
                    "output_bias": head["output_bias"] - lr_head * dlogits.sum(0)}
        top = g_local
    g = np.concatenate([t(top) for t in tops])
    g_in, new_rows, _ = core_backward(g, rows, trace, ALPHA, "softsign", lr_layer)
    return new_rows, g_in, new_head


def test_a_sections_local_step_matches_a_float64_reference(model, data):
    settings = MachSettings(inputs="mixed", local_weight=0.5, max_delay=3).check()
    s, links = _section_pair(model, data, settings)
    before, head = s.params.copy(), {k: v.copy() for k, v in s.heads.items()}
    message = _input(0, data)
    links[0].send_up(message)
    s.step(0.05, 0.02)
    want_rows, g_in, want_head = _reference_section_step(
        before, head, [message["h"]], [lambda top: 0.5 * top], 0.05, 0.02, data[1][message["idx"]])
    assert_update_close(s.params, before, want_rows, what="core")
    for key in want_head:
        assert_update_close(s.heads[key], head[key], want_head[key], what=key)
    kept = s.kept[0]
    assert_close(kept.local, g_in.T, what="the own loss's gradient kept for the late one")
    assert s.counters["real_inputs"] == 1 and s.counters["distill_steps"] == 1
    assert links[0].downs[0] == [] and len(links[1].ups[2]) == 1   # nothing down yet; the state went up


def test_a_late_gradient_is_applied_with_the_current_weights(model, data):
    settings = MachSettings(inputs="mixed", local_weight=0.5, delayed_weight=2.0, max_delay=3).check()
    s, links = _section_pair(model, data, settings)
    first, second = _input(0, data), _input(1, data)
    links[0].send_up(first)
    s.step(0.05, 0.02)
    local_first = s.kept[0].local.copy()
    late = np.random.default_rng(9).normal(0, 0.1, (WIDTH, BATCH)).astype(np.float32)
    links[2].send_down({"id": 0, "g": late})
    links[0].send_up(second)
    before, head = s.params.copy(), {k: v.copy() for k, v in s.heads.items()}
    s.step(0.05, 0.02)
    want_rows, g_in, _ = _reference_section_step(
        before, head, [second["h"], first["h"]],
        [lambda top: 0.5 * top, lambda top: 2.0 * late.T.astype(np.float64)], 0.05, 0.02, data[1][second["idx"]])
    assert_update_close(s.params, before, want_rows, what="core")
    sent = links[1].downs[0]
    assert [m["id"] for m in sent] == [first["id"]]
    # what goes down is the complete gradient at the first minibatch's input: its own-loss part, kept
    # from the step that made it, plus the late part through the current weights
    assert_close(sent[0]["g"], g_in[BATCH:].T + local_first, what="the gradient sent down")
    assert s.counters["late_applied"] == 1 and s.counters["dropped"] == 0


def test_gradients_past_the_bound_are_dropped_and_counted(model, data):
    settings = MachSettings(inputs="mixed", local_weight=1.0, max_delay=1).check()
    s, links = _section_pair(model, data, settings)
    for i in range(3):
        links[0].send_up(_input(i, data))
        s.step(0.05, 0.02)
    # minibatch 0 is 3 steps old at the next step: forgotten, its own-loss gradient sent down alone
    links[2].send_down({"id": 0, "g": np.ones((WIDTH, BATCH), np.float32)})
    links[0].send_up(_input(3, data))
    s.step(0.05, 0.02)
    assert s.counters["dropped"] == 1
    assert s.counters["unanswered"] == 2
    assert sorted(m["id"] for m in links[1].downs[0]) == [0, 1]


def test_mixed_inputs_take_the_newest_real_one_else_a_synthetic_one(model, data):
    s, links = _section_pair(model, data, MachSettings(inputs="mixed").check())
    s.step(0.05, 0.02)                                   # nothing arrived: synthetic
    for i in range(3):
        links[0].send_up(_input(i, data))
    s.step(0.05, 0.02)
    assert s.counters["synthetic_inputs"] == 1 and s.counters["real_inputs"] == 1
    assert s.counters["skipped_inputs"] == 2 and s.counters["distill_steps"] == 3
    assert list(s.kept) == [1] and s.kept[1].below == 2  # the newest (id 2) was used
    assert len(links[1].ups[2]) == 1                     # only the real one goes up


# ----------------------------------------------------------------------------- the exact case


@pytest.mark.parametrize("count", [1, 2, 3])
def test_lockstep_with_no_delay_no_local_loss_and_real_inputs_is_exact_sgd_bit_for_bit(model, data, tmp_path, count):
    path, core, heads, alpha = model
    x, y = data
    copy = tmp_path / "ref.h5"
    copy.write_bytes(path.read_bytes())
    draw = np.random.default_rng(11)
    with DeepNet.open(copy, writable=True, in_memory=True, chunk_layers=50) as net:
        losses = []
        for _ in range(4):
            idx = draw.integers(0, N, size=BATCH)
            losses.append(net.train_step(x[idx], y[idx], layer_lr=0.05, head_lr=0.02).loss)
        want_core, want_heads = net.core_weights.copy(), {k: v.copy() for k, v in net.heads.items()}
    settings = MachSettings(inputs="real", local_weight=0.0, delayed_weight=1.0, max_delay=0).check()
    mine = core.copy()
    sections = _sections(mine, heads, alpha, data, settings, count)
    got = [lockstep(sections, 0.05, 0.02)[-1].loss for _ in range(4)]
    assert np.array_equal(mine, want_core)
    for key in want_heads:
        owner = sections[0] if key.startswith("input") else sections[-1]
        assert np.array_equal(owner.heads[key], want_heads[key]), key
    assert got == pytest.approx(losses, rel=0, abs=0)


def test_with_a_local_loss_the_sections_move_away_from_exact_sgd(model, data):
    _, core, heads, alpha = model
    exact, local = core.copy(), core.copy()
    for rows, weight in ((exact, 0.0), (local, 1.0)):
        settings = MachSettings(inputs="real", local_weight=weight, max_delay=0).check()
        sections = _sections(rows, heads, alpha, data, settings, 2)
        lockstep(sections, 0.05, 0.02)
    # one step: section 0 feels its own loss too; the last section's own loss is the model's
    assert not np.array_equal(exact[:LAYERS // 2], local[:LAYERS // 2])
    assert np.array_equal(exact[LAYERS // 2:], local[LAYERS // 2:])


# ----------------------------------------------------------------------------- settings, state, evaluation


@pytest.mark.parametrize("given,message", [
    ({"inputs": "sometimes"}, "--mach-inputs must be one of mixed, real"),
    ({"max_delay": -1}, "max-delay"),
    ({"local_weight": -0.5}, "local-weight"),
    ({"distill_hidden": 0}, "distill-hidden"),
])
def test_bad_mach_settings_are_refused_naming_the_flag(given, message):
    with pytest.raises(ConfigError, match=message):
        MachSettings.resolve(given, None)


def test_settings_resolve_flags_over_stored_over_defaults():
    s = MachSettings.resolve({"max_delay": 2, "local_weight": None}, {"local_weight": 0.25, "max_delay": 7})
    assert (s.max_delay, s.local_weight, s.inputs) == (2, 0.25, "mixed")


def test_mach_flags_need_mach_mode_and_mach_mode_needs_mpiexec(tmp_path):
    with pytest.raises(ConfigError, match="--max-delay applies to --mode mach"):
        deepnet.train(tmp_path / "m.h5", max_delay=3)
    with pytest.raises(ConfigError, match="mpiexec -n 4 deepnet train"):
        deepnet.train(tmp_path / "m.h5", mode="mach", sections=4)
    with pytest.raises(ConfigError, match=r"--sections must be an integer >= 2 \(one section is exact SGD"):
        deepnet.train(tmp_path / "m.h5", mode="mach", sections=1)
    with pytest.raises(ConfigError, match="--mode must be one of exact, mach"):
        deepnet.train(tmp_path / "m.h5", mode="fast")
    assert not (tmp_path / "m.h5").exists()


def test_a_bad_mach_flag_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepnet", "train", str(tmp_path / "m.h5"), "--max-delay", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["deepnet: error: --max-delay applies to --mode mach"]


def _state(count: int, heads: dict) -> MachState:
    sections = []
    for k in range(count):
        head = None if k == count - 1 else _heads_of(k, count, heads)
        head = None if head is None else {key: head[key] for key in layout.MACH_HEAD_KEYS}
        distill = None if k == 0 else DistilledInput.new(heads, 8, np.random.default_rng(k)).params()
        sections.append(SectionState(head, distill, {"k": k}, {"steps": 3 * k}))
    log = np.array([(k, 5, 1.5, 0.25, 0.01, 1) for k in range(count)], dtype=layout.MACH_LOG_DTYPE)
    return MachState(5, {"inputs": "mixed", "max_delay": 2}, sections, log)


def test_the_mach_state_is_written_and_read_back(model, tmp_path):
    _, _, heads, _ = model
    state = _state(3, heads)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_mach(f, state)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        back = read_mach(f, "s.h5", width=WIDTH, input_dim=784, n_classes=10)
    assert back.step == 5 and back.settings == state.settings
    assert np.array_equal(back.log, state.log)
    for a, b in zip(back.sections, state.sections):
        assert a.rng_state == b.rng_state and a.counters == b.counters
        for part in ("head", "distill"):
            x, y = getattr(a, part), getattr(b, part)
            assert (x is None) == (y is None)
            assert x is None or all(np.array_equal(x[k], y[k]) for k in y)


def test_a_damaged_mach_state_is_one_line(model, tmp_path):
    _, _, heads, _ = model
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_mach(f, _state(2, heads))
        del f[layout.mach_section_group(1) + "/distill/w2"]
    with h5py.File(tmp_path / "s.h5", "r") as f, pytest.raises(deepnet.errors.DamagedFileError, match="/mach"):
        read_mach(f, "s.h5", width=WIDTH, input_dim=784, n_classes=10)


def test_eval_section_refuses_what_is_not_a_mach_model(model, tmp_path):
    path, _, _, _ = model
    with pytest.raises(ConfigError, match="not a Mach model"):
        evaluate_section(path, 0)
    root = tmp_path / "root.h5"
    shards.shard_model(path, 2, root)
    with pytest.raises(ConfigError, match="no Mach sections"):
        evaluate_section(root, 0)
    with pytest.raises(ConfigError, match="--synthetic needs --section"):
        deepnet.evaluate(root, synthetic=True)
