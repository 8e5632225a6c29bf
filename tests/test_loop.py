"""The one training loop (deepnet.training.loop): minibatch draws, hook order, stopping, at_end."""

from __future__ import annotations

import numpy as np

from deepnet.data.dataset import ArrayMinibatches
from deepnet.training import loop
from deepnet.training.loop import Hook, StepEvent


class Recorder(Hook):
    def __init__(self, name, seen, stop_at=None):
        self.name, self.seen, self.stop_at = name, seen, stop_at

    def after_step(self, event: StepEvent) -> None:
        self.seen.append((self.name, event.done, event.result))
        if event.done == self.stop_at:
            event.stop = True

    def at_end(self) -> None:
        self.seen.append((self.name, "end", None))


def test_draws_steps_and_calls_the_hooks_in_order():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    drawn, seen = [], []

    def step(xb, yb, t):
        drawn.append(yb.tolist())
        return t

    done = loop.run(step, ArrayMinibatches(x, y), rng=np.random.default_rng(3), batch=4, steps=3,
                    hooks=[Recorder("a", seen), Recorder("b", seen)])
    rng = np.random.default_rng(3)
    assert drawn == [rng.integers(0, 10, size=4).tolist() for _ in range(3)]  # the recipe's draws
    assert done == 3
    assert seen == [("a", 1, 0), ("b", 1, 0), ("a", 2, 1), ("b", 2, 1), ("a", 3, 2), ("b", 3, 2),
                    ("a", "end", None), ("b", "end", None)]


def test_a_hook_or_a_request_stops_the_run():
    x, y = np.zeros((5, 1)), np.zeros(5, dtype=int)
    seen = []
    done = loop.run(lambda xb, yb, t: t, ArrayMinibatches(x, y), rng=np.random.default_rng(0), batch=1, steps=10,
                    hooks=[Recorder("a", seen, stop_at=2), Recorder("b", seen)])
    assert done == 2 and seen[-3:] == [("b", 2, 1), ("a", "end", None), ("b", "end", None)]
    requests = iter([False, False, True])
    assert loop.run(lambda xb, yb, t: t, ArrayMinibatches(x, y), rng=np.random.default_rng(0), batch=1, steps=10,
                    stop_requested=lambda: next(requests)) == 2
