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
        # relative to the largest task, so no power overflows however small the temperature (a
        # task far smaller than the largest then gets probability 0, as in the limit T -> 0)
        sizes = np.array(self.sizes, dtype=np.float64)
        weights = (sizes / sizes.max()) ** (1.0 / temperature)
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

    def load_state_dict(self, state: dict, damaged: str = "") -> None:
        """Restores `state_dict()`'s output; the training data must be the same. A state that no
        sampler wrote is a ValueError starting with `damaged` (its file, say)."""
        if not isinstance(state, dict) or not all(k in state for k in ("rng", "order", "cursor", "names", "sizes")):
            raise ValueError(f"{damaged}not a sampler's state (rng, order, cursor, names, sizes)")
        if state["names"] != self.names or state["sizes"] != self.sizes:
            saved, now = dict(zip(state["names"], state["sizes"])), dict(zip(self.names, self.sizes))
            changed = [f"{t} ({saved.get(t, 'absent')} then, {now.get(t, 'absent')} now)"
                       for t in sorted(set(saved) | set(now)) if saved.get(t) != now.get(t)]
            raise ValueError(f"the training data changed since the checkpoint: {', '.join(changed)} training "
                             "examples; the run cannot resume exactly on other data (--overwrite starts it over)")
        order, cursor = state["order"], state["cursor"]
        if not isinstance(order, dict) or not isinstance(cursor, dict) or set(order) != set(self.names) or \
                set(cursor) != set(self.names):
            raise ValueError(f"{damaged}order and cursor must hold one entry per task ({', '.join(self.names)})")
        for name, n in zip(self.names, self.sizes):
            o, c = order[name], cursor[name]
            if not isinstance(o, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in o) or \
                    (o and sorted(o) != list(range(n))):
                raise ValueError(f"{damaged}order[{name!r}] is not an order of its {n} examples")
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= len(o):
                raise ValueError(f"{damaged}cursor[{name!r}] is {c!r}, not a place in its order of {len(o)}")
        try:
            self.rng.bit_generator.state = state["rng"]
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{damaged}rng is not a PCG64 state ({error})") from None
        self.order = {n: np.array(order[n], dtype=np.int64) for n in self.names}
        self.cursor = {n: cursor[n] for n in self.names}
