"""Temperature sampling over tasks, with a state that checkpoints exactly.

Task i is drawn with probability proportional to n_i^(1/T), n_i its number of training
examples: T = 1 samples in proportion to size, T -> infinity uniformly over tasks (T5, mT5).
Inside a task, examples are visited in a fresh random order every epoch, so every example is
seen once before any is seen twice.
"""

from __future__ import annotations

import numpy as np


class MixtureSampler:
    def __init__(self, sizes: dict[str, int], temperature: float = 2.0, seed: int = 0):
        if not sizes:
            raise ValueError("the mixture has no tasks")
        empty = [name for name, n in sizes.items() if n <= 0]
        if empty:
            raise ValueError(f"tasks with no training examples cannot be sampled: {empty}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.names = sorted(sizes)
        self.sizes = [sizes[n] for n in self.names]
        weights = np.array(self.sizes, dtype=np.float64) ** (1.0 / temperature)
        self.probs = weights / weights.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.order = {n: np.zeros(0, dtype=np.int64) for n in self.names}
        self.cursor = {n: 0 for n in self.names}

    def sample(self, batch_size: int) -> list[tuple[str, int]]:
        """batch_size (task name, example index) pairs."""
        tasks = self.rng.choice(len(self.names), size=batch_size, p=self.probs)
        out = []
        for t in tasks:
            name = self.names[t]
            if self.cursor[name] >= len(self.order[name]):
                self.order[name] = self.rng.permutation(self.sizes[t])
                self.cursor[name] = 0
            out.append((name, int(self.order[name][self.cursor[name]])))
            self.cursor[name] += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": {n: o.tolist() for n, o in self.order.items()},
                "cursor": dict(self.cursor), "names": self.names, "sizes": self.sizes}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["sizes"] != self.sizes:
            saved, now = dict(zip(state["names"], state["sizes"])), dict(zip(self.names, self.sizes))
            changed = [f"{t} ({saved.get(t, 'absent')} then, {now.get(t, 'absent')} now)"
                       for t in sorted(set(saved) | set(now)) if saved.get(t) != now.get(t)]
            raise ValueError(f"the training data changed since the checkpoint: {', '.join(changed)} training "
                             "examples; the run cannot resume exactly on other data (--overwrite starts it over)")
        self.rng.bit_generator.state = state["rng"]
        self.order = {n: np.array(o, dtype=np.int64) for n, o in state["order"].items()}
        self.cursor = dict(state["cursor"])
