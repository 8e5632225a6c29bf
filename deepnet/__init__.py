"""deepnet: exact SGD through absurdly deep, narrow residual networks on a CPU.

The Python API (deepnet.api; the `deepnet` command is built from it). Each function returns its result
and prints nothing; ``progress=True`` shows progress bars, ``on_report=`` receives training report rows:

- ``deepnet.init(path, layers=..., width=..., activation=..., input_dim=784, seed=...)`` creates a model file;
- ``deepnet.DeepNet.open(path, writable=True, in_memory=False)`` opens one, with
  ``net.train_step(x, y, layer_lr=..., head_lr=...)``, ``net.evaluate(x, y)``, ``net.logits(x)``, ``net.save()``;
- ``deepnet.train(path, steps=...)`` and ``deepnet.evaluate(path, test_samples=...)`` run the recipe (MNIST, or ``data=...``)
  (options: schedules, held-out evaluation, weight average, MLP branch: see deepnet.training.options);
- ``deepnet.speedrun(target_acc=..., layers=...)`` times a run to a target accuracy (its recipe:
  ``deepnet.SPEEDRUN``); ``deepnet.train_mlp``/``evaluate_mlp`` the MLP baseline;
- ``deepnet.info``, ``check``, ``bench``, ``plot``, ``import_raw``, ``export_raw``, ``fetch_data``,
  ``teacher``, ``diagnose``, ``luckmatters``, ``list_activations``, ``check_activation``,
  ``compile_activations``, ``shard``, ``gather``: the other commands;
- ``deepnet.ModelFile`` is the HDF5 file itself; ``deepnet.activations`` the activation registry.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "DeepNet": "deepnet.nn.network",
    "StepResult": "deepnet.nn.network",
    "EvalResult": "deepnet.nn.network",
    "ModelFile": "deepnet.formats.hdf5",
    "RECIPE": "deepnet.training.options",
    "TrainOptions": "deepnet.training.options",
    "SPEEDRUN": "deepnet.training.speedrun",
    "Schedule": "deepnet.training.schedule",
    **{name: "deepnet.api" for name in (
        "init", "train", "evaluate", "speedrun", "info", "check", "bench", "train_mlp", "evaluate_mlp",
        "import_raw", "export_raw", "plot", "fetch_data", "teacher", "diagnose", "luckmatters",
        "list_activations", "check_activation", "compile_activations", "shard", "gather")},
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> object:
    # Imported on first use so `import deepnet` stays cheap (the CLI's --help, the build's setup.py).
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepnet' has no attribute {name!r}")
