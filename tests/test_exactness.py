"""One SGD step is exact: deepnet's float32 step agrees with an independent float64 reference.

The reference (tests/reference.py) is written from DESIGN.md's "The model" and is itself checked
against central finite differences, so the chain is: finite differences -> reference -> kernels and
``DeepNet.train_step``. Weights are uniform(-0.5, 0.5) (not the 1e-3 default, under which the core is
nearly the identity and a wrong core would go unnoticed) and the learning rates make the updates large
compared with the tolerance; every comparison also checks the *update* on its own scale.
"""

from __future__ import annotations

import numpy as np
import pytest

import deepnet
from deepnet import DeepNet, ModelFile, activations
from helpers import kernel_builds, make_model
from reference import (
    Model64,
    assert_close,
    assert_step_is_the_gradient,
    finite_difference_grads,
    assert_update_close,
    kernel_backward,
    kernel_forward,
    softmax_xent,
    train_step,
)

ACTIVATIONS = ["tanh", "softsign", "relu"]


def random_model64(rng, *, input_dim, width, layers, n_classes, activation, alpha=None, scale=0.5) -> Model64:
    u = lambda *shape, s=scale: rng.uniform(-s, s, size=shape)  # noqa: E731
    return Model64(u(input_dim, width), u(width), u(layers, width * width + width), u(width, n_classes),
                   u(n_classes), alpha if alpha is not None else 1.0 / np.sqrt(layers), activation)


# ---------------------------------------------------------------------------------------------------
# the reference itself


def test_activation_derivatives_match_finite_differences():
    z = np.linspace(-3, 3, 601)
    z = z[(np.abs(z) > 1e-3) & (np.abs(np.abs(z) - 1) > 1e-3)]  # relu's kink at 0, hardtanh's at +-1
    for name in activations.available():
        act = activations.get(name)
        eps = 1e-6
        fd = (act.forward_np(z + eps) - act.forward_np(z - eps)) / (2 * eps)
        np.testing.assert_allclose(act.derivative_np(z, act.forward_np(z)), fd, rtol=1e-6, atol=1e-8,
                                   err_msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_gradient_matches_finite_differences(activation):
    """The reference's layer-by-layer backward (with in-place updates) is the true gradient."""
    rng = np.random.default_rng(1)
    m = random_model64(rng, input_dim=6, width=3, layers=5, n_classes=10, activation=activation, alpha=0.7)
    x = rng.uniform(0, 1, size=(4, 6))
    y = rng.integers(0, 10, size=4)
    res = train_step(m, x, y, layer_lr=0.3, head_lr=0.2)
    assert res.loss == pytest.approx(m.loss(x, y), rel=1e-12)

    assert_step_is_the_gradient(m, res, lambda: m.loss(x, y), layer_lr=0.3, head_lr=0.2)


# ---------------------------------------------------------------------------------------------------
# DeepNet.train_step against the reference


def _snapshot(net: DeepNet) -> tuple[dict, np.ndarray]:
    """Heads and core as they are in the file after save() (so the check covers the write-back too)."""
    net.save()
    return {k: v.copy() for k, v in net.file.read_heads().items()}, net.file.read_core()


@pytest.mark.parametrize("chunk_layers", [100_000, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
@pytest.mark.parametrize("width", [3, 4, 5, 9])  # 3, 4, 5: width-specialised kernels; 9: the generic one
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_train_step_matches_reference(tmp_path, activation, width, in_memory, chunk_layers):
    layers, batch, layer_lr, head_lr = 50, 5, 0.5, 0.2
    path = make_model(tmp_path / "m.h5", layers=layers, width=width, activation=activation, seed=width)
    rng = np.random.default_rng(7)
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        alpha = net.file.alpha
        assert alpha == pytest.approx(1 / np.sqrt(layers))
        heads, core = _snapshot(net)
        for step in (1, 2, 3):  # several steps: buffers and saved states are reused correctly
            x = rng.uniform(0, 1, size=(batch, 784)).astype(np.float32)
            y = rng.integers(0, 10, size=batch)
            ref = train_step(Model64.from_arrays(heads, core, alpha, activation), x, y, layer_lr, head_lr)
            result = net.train_step(x, y, layer_lr=layer_lr, head_lr=head_lr)
            assert result.step == step and net.step == step
            assert result.loss == pytest.approx(ref.loss, rel=1e-5)
            assert result.batch_acc == ref.accuracy
            new_heads, new_core = _snapshot(net)

            assert_close(new_core, ref.model.core, what=f"step {step} core")
            assert_update_close(new_core, core, ref.model.core, what=f"step {step} core update")
            for key, value in ref.model.heads().items():
                assert_close(new_heads[key], value, what=f"step {step} {key}")
                assert_update_close(new_heads[key], heads[key], value, what=f"step {step} {key} update")
            # The layers matter here: the update of the core is far above the tolerance of the check.
            assert np.max(np.abs(new_core - core)) > 1e3 * 1e-5 * np.max(np.abs(core))
            heads, core = new_heads, new_core
    with ModelFile.open(path) as f:
        assert f.step == 3


def test_train_step_matches_reference_model_from_init_scale(tmp_path):
    """A model made by ModelFile.create(init_scale=...) (not overwritten): the same agreement."""
    path = tmp_path / "m.h5"
    ModelFile.create(path, layers=40, width=4, activation="softsign", init_scale=0.5, seed=3,
                     input_dim=30, progress=False).close()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(6, 30)).astype(np.float32)
    y = rng.integers(0, 10, size=6)
    with DeepNet.open(path, writable=True) as net:
        heads, core = _snapshot(net)
        ref = train_step(Model64.from_arrays(heads, core, net.file.alpha, "softsign"), x, y, 0.5, 0.5)
        result = net.train_step(x, y, layer_lr=0.5, head_lr=0.5)
        new_heads, new_core = _snapshot(net)
    assert result.loss == pytest.approx(ref.loss, rel=1e-5)
    assert_close(new_core, ref.model.core, what="core")
    assert_update_close(new_core, core, ref.model.core, what="core update")
    for key, value in ref.model.heads().items():
        assert_update_close(new_heads[key], heads[key], value, what=key)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_logits_and_evaluate_match_reference(tmp_path, activation):
    path = make_model(tmp_path / "m.h5", layers=50, width=4, activation=activation, input_dim=20)
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(37, 20)).astype(np.float32)
    y = rng.integers(0, 10, size=37)
    with DeepNet.open(path) as net:
        heads, core = net.file.read_heads(), net.file.read_core()
        m = Model64.from_arrays(heads, core, net.file.alpha, activation)
        ref_logits = m.logits(x)
        assert_close(net.logits(x), ref_logits, what="logits")
        result = net.evaluate(x, y, batch=8)  # 5 batches, the last one partial
    ref_loss, _ = softmax_xent(ref_logits, y)
    assert result.samples == 37
    assert result.loss == pytest.approx(ref_loss, rel=1e-5)
    assert result.accuracy == pytest.approx(np.mean(np.argmax(ref_logits, axis=1) == y), abs=1e-12)


@pytest.mark.parametrize("lr", [0.01, 1.0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_applied_update_is_the_finite_difference_gradient(tmp_path, activation, lr):
    """grad = (w_before - w_after) / lr of what the kernels applied == central differences of the loss.

    The step uses only pre-step weights for every gradient, so this holds for any lr, small or large;
    a large lr would expose an update applied before the gradient flowed on through the old weights.
    """
    path = make_model(tmp_path / "m.h5", layers=6, width=3, activation=activation, input_dim=6, seed=11)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=(4, 6)).astype(np.float32)
    y = rng.integers(0, 10, size=4)
    with DeepNet.open(path, writable=True) as net:
        heads, core = _snapshot(net)
        net.train_step(x, y, layer_lr=lr, head_lr=lr)
        new_heads, new_core = _snapshot(net)
    m = Model64.from_arrays(heads, core, 1 / np.sqrt(6), activation)
    after = dict(new_heads, core=new_core)
    for key, fd in finite_difference_grads(m, lambda: m.loss(x, y)).items():
        param = getattr(m, key)
        applied = (param - after[key].astype(np.float64)) / lr
        scale = np.max(np.abs(fd))
        # float32 storage of the weights limits how well (before - after) / lr is known.
        roundoff = 4 * np.finfo(np.float32).eps * np.max(np.abs(param)) / lr
        assert np.max(np.abs(applied - fd)) <= 1e-3 * scale + roundoff, key


# ---------------------------------------------------------------------------------------------------
# the kernels, called directly


# Every build of the built-in kernels this machine can run (portable; AVX2, AVX-512 where the CPU has them).
KERNEL_MODULES = {m.__name__.rsplit(".", 1)[-1]: m for m in kernel_builds()}


@pytest.fixture(params=sorted(KERNEL_MODULES))
def kern(request):
    """One compiled kernel module (each build is tested against the reference)."""
    return KERNEL_MODULES[request.param]


def kernel_case(seed, width, batch, layers, scale=None):
    rng = np.random.default_rng([seed, width, batch, layers])
    a = scale if scale is not None else 1.0 / np.sqrt(width)
    params = rng.uniform(-a, a, size=(layers, width * width + width)).astype(np.float32)
    h = rng.uniform(-1, 1, size=(width, batch)).astype(np.float32)
    g = rng.uniform(-1, 1, size=(width, batch)).astype(np.float32)
    return params, h, g


def run_kernels(kern, activation, params, h, g, alpha, lr, save_every):
    """forward (with saves) then backward, as the engine does; returns (h_out, saves, g_in, params_after)."""
    idx = kern.activation_index(activation)
    w, B = h.shape
    n = params.shape[0]
    h_out = h.copy()
    saves = np.full((-(-n // save_every), w * B), np.nan, np.float32)
    work = np.full(kern.workspace_size(w, B, save_every), np.nan, np.float32)
    kern.forward(idx, params, h_out, alpha, saves, save_every, work)
    p = params.copy()
    g_in = g.copy()
    kern.backward(idx, p, saves, save_every, g_in, alpha, lr, work)
    return h_out, saves, g_in, p


WIDTHS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 24, 32, 33]  # 9, 12, 15, 24, 33: the generic (any-width) path; the rest specialised
BATCHES = [1, 7, 8, 9, 17]              # around the 8-lane batch sums


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernels_match_reference(kern, activation, width, batch):
    layers, alpha, lr, save_every = 12, 0.3, 0.1, 5   # segments of 5, 5, 2
    params, h, g = kernel_case(0, width, batch, layers)
    h_out, saves, g_in, p = run_kernels(kern, activation, params, h, g, alpha, lr, save_every)

    ref_h, ref_saves = kernel_forward(params, h, alpha, activation, save_every)
    assert_close(h_out, ref_h, what="forward h")
    assert_close(saves, ref_saves, scale=np.max(np.abs(ref_h)), what="saved states")
    assert np.array_equal(saves[0], h.reshape(-1)), "the first saved state is the chunk's input"

    ref_g, ref_params = kernel_backward(params, h, g, alpha, activation, lr)
    assert_close(g_in, ref_g, what="backward g")
    assert_close(p, ref_params, what="updated params")
    assert_update_close(p, params, ref_params, what="params update")


def batch_sum_tree(x: np.ndarray) -> np.ndarray:
    """A layer's gradient over the batch as the kernels add it, in float32: each block of 8 samples in
    the tree ((x0 + x2) + (x1 + x3)) + ((x4 + x6) + (x5 + x7)), the blocks' sums added in turn."""
    total = None
    for b in range(0, x.shape[-1], 8):
        s = [x[..., b + k] for k in range(8)]
        block = ((s[0] + s[2]) + (s[1] + s[3])) + ((s[4] + s[6]) + (s[5] + s[7]))
        total = block if total is None else total + block
    return total


@pytest.mark.parametrize("batch", [8, 16, 24])
@pytest.mark.parametrize("width", [3, 5, 12, 16, 24, 32])   # the shuffled tree (3, 5) and the column sums (12-32)
def test_weight_gradients_are_summed_in_the_fixed_tree(kern, width, batch):
    """Every path sums a gradient over the batch in one fixed order of float32 additions of rounded
    products: with zero weights (so dz = g alpha exactly and g passes unchanged) and lr = 1, the
    updated row is minus that sum, bit for bit."""
    rng = np.random.default_rng([width, batch])
    params = np.zeros((1, width * width + width), np.float32)
    h = rng.uniform(-1, 1, size=(width, batch)).astype(np.float32)
    g = rng.uniform(-1, 1, size=(width, batch)).astype(np.float32)
    alpha = np.float32(0.75)
    idx = kern.activation_index("softsign")   # softsign'(0) = 1: dk = alpha exactly
    saves = h.reshape(1, -1).copy()
    work = np.empty(kern.workspace_size(width, batch, 1), np.float32)
    g_in = g.copy()
    kern.backward(idx, params, saves, 1, g_in, float(alpha), 1.0, work)
    dz = g * alpha
    dw = batch_sum_tree(h[:, None, :] * dz[None, :, :])          # [i, j]
    db = batch_sum_tree(dz)
    want = -np.concatenate([dw.reshape(-1), db]) + np.float32(0)  # 0 - gk: no negative zeros
    assert np.array_equal(params[0] + np.float32(0), want)
    assert np.array_equal(g_in, g)


@pytest.mark.parametrize("width, batch", [(4, 9), (5, 16), (2, 1), (32, 1), (16, 7)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernels_save_every_does_not_change_results(kern, activation, width, batch):
    """Recomputing from checkpoints is bit-identical to the forward pass, for any checkpoint spacing."""
    layers, alpha, lr = 13, 0.3, 0.1
    params, h, g = kernel_case(1, width, batch, layers)
    ref_g, ref_params = kernel_backward(params, h, g, alpha, activation, lr)
    results = {}
    for save_every in (1, 2, 5, 12, 13, 100):
        h_out, _, g_in, p = run_kernels(kern, activation, params, h, g, alpha, lr, save_every)
        assert_close(g_in, ref_g, what=f"save_every={save_every} g")
        assert_update_close(p, params, ref_params, what=f"save_every={save_every} params")
        results[save_every] = (h_out, g_in, p)
    first = results[1]
    for save_every, got in results.items():
        for a, b in zip(first, got):
            assert np.array_equal(a, b), f"save_every={save_every} differs bitwise from save_every=1"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernels_chunked_calls_equal_one_call(kern, activation):
    """Splitting the layers over several kernel calls (as the engine does per chunk) is bit-identical."""
    width, batch, layers, alpha, lr = 4, 11, 30, 0.25, 0.1
    params, h, g = kernel_case(2, width, batch, layers)
    idx = kern.activation_index(activation)
    h_one, _, g_one, p_one = run_kernels(kern, activation, params, h, g, alpha, lr, 30)

    bounds = [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]
    p = params.copy()
    hh = h.copy()
    saves = {}
    for a, b in bounds:
        saves[a] = np.empty((-(-(b - a) // 3), width * batch), np.float32)
        kern.forward(idx, p[a:b], hh, alpha, saves[a], 3)
    gg = g.copy()
    for a, b in reversed(bounds):
        chunk = np.ascontiguousarray(p[a:b])
        kern.backward(idx, chunk, saves[a], 3, gg, alpha, lr)
        p[a:b] = chunk
    assert np.array_equal(hh, h_one)
    assert np.array_equal(gg, g_one)
    assert np.array_equal(p, p_one)


def test_kernels_forward_without_saves_and_lr_zero(kern):
    width, batch, layers, alpha = 5, 9, 10, 0.3
    params, h, g = kernel_case(3, width, batch, layers)
    idx = kern.activation_index("tanh")
    h_plain = h.copy()
    kern.forward(idx, params, h_plain, alpha)        # evaluation: nothing saved, own scratch
    h_out, saves, g_in, p = run_kernels(kern, "tanh", params, h, g, alpha, 0.0, 4)
    assert np.array_equal(h_plain, h_out)
    assert np.array_equal(p, params), "lr = 0 must leave the layers unchanged"
    ref_g, _ = kernel_backward(params, h, g, alpha, "tanh", 0.0)
    assert_close(g_in, ref_g, what="g with lr 0")


def test_kernels_check_their_arguments(kern):
    idx = kern.activation_index("relu")
    params = np.zeros((3, 20), np.float32)
    h = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError):
        kern.forward(idx, np.zeros((3, 19), np.float32), h, 0.1)
    with pytest.raises(ValueError):
        kern.forward(idx, params, h, 0.1, np.zeros((1, 8), np.float32), 2)   # needs 2 saved states
    with pytest.raises(ValueError):
        kern.backward(idx, params, np.zeros((3, 8), np.float32), 1, h, 0.1, 0.1, np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        kern.forward(99, params, h, 0.1)
    with pytest.raises(ValueError):
        kern.activation_index("no-such-activation")


def test_deepnet_init_uses_the_design_defaults(tmp_path):
    """The defaults the exactness tests deliberately override: alpha 1/sqrt(L), core in [-1e-3, 1e-3]."""
    path = tmp_path / "m.h5"
    deepnet.init(path, layers=64, width=4, activation="tanh", seed=0, progress=False)
    with ModelFile.open(path) as f:
        assert f.alpha == pytest.approx(1 / 8)
        core = f.read_core()
        heads = f.read_heads()
    assert np.all(np.abs(core[:, :16]) <= 1e-3) and np.all(core[:, 16:] == 0)
    assert np.all(heads["input_bias"] == 0) and np.all(heads["output_bias"] == 0)
    lim = np.sqrt(6 / (784 + 4))
    assert np.all(np.abs(heads["input_weight"]) <= lim) and np.max(np.abs(heads["input_weight"])) > 0.9 * lim
