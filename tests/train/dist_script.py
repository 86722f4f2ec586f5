"""One process of a test_distributed.py run: `generalist train` on the toy tasks (tests/train/toy_tasks.py).

    python dist_script.py [--dump DIR] [--die-at K | --hang-at K | --term-at K] [--rank-to-fail R] [--nan-at M]
                          -- train ARGS...

Run it plainly for one process, under torchrun, or with torchrun's environment set by hand. It
calls the real command line (generalist.cli.main) with the mixture and tasks swapped for the toy
ones; --dump writes each rank's final weights to DIR/rank<R>.safetensors; --die-at / --hang-at
make rank R SIGKILL itself / stop answering after its step K, --term-at K send itself SIGTERM (as a
scheduler would); --nan-at M makes the loss of the
run's M-th micro-batch (from 0) NaN, in one process and on every rank alike. Dumped FSDP weights are gathered
in full (expert-parallel ones are each rank's own shard), with rank<R>.json: how many blocks there are,
how many are compiled, and how many graphs dynamo compiled.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import toy_tasks  # noqa: E402

import generalist.train.data as train_data  # noqa: E402
from generalist.cli import main  # noqa: E402
from generalist.train.trainer import Trainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dump")
parser.add_argument("--die-at", type=int, default=0)
parser.add_argument("--hang-at", type=int, default=0)
parser.add_argument("--term-at", type=int, default=0)
parser.add_argument("--rank-to-fail", type=int, default=1)
parser.add_argument("--nan-at", type=int, default=-1)
parser.add_argument("cli", nargs=argparse.REMAINDER)
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))

_build = train_data.build_data
train_data.get_mixture = lambda name: toy_tasks.MIXTURE
train_data.build_data = lambda mixture, seed=0, progress=True: _build(mixture, tasks=toy_tasks.TASKS, seed=seed,
                                                                      progress=False)

if args.die_at or args.hang_at or args.term_at:
    _step = Trainer.train_step

    def failing_step(self):
        rec = _step(self)
        if rank == args.rank_to_fail and rec["step"] == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == args.rank_to_fail and rec["step"] == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if rank == args.rank_to_fail and rec["step"] == args.hang_at:
            time.sleep(3600)
        return rec
    Trainer.train_step = failing_step

if args.nan_at >= 0:
    from generalist.train import distributed

    calls = [0]

    def poisoned(forward):
        def wrapped(self, *a, **k):
            loss, *rest = forward(self, *a, **k)
            if calls[0] == args.nan_at:
                loss = loss * float("nan")
                if rest and isinstance(rest[-1], dict):  # the data-parallel stats: the loss every rank reports
                    rest[-1]["report"] = rest[-1]["report"] * float("nan")
            calls[0] += 1
            return (loss, *rest)
        return wrapped
    Trainer._micro_batch_loss = poisoned(Trainer._micro_batch_loss)
    distributed._MicroBatch.forward = poisoned(distributed._MicroBatch.forward)

if args.dump:
    _fit = Trainer.fit

    def dumping_fit(self):
        _fit(self)
        from safetensors.torch import save_file
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP: every rank gathers every tensor
                 for k, v in self.model.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(Path(args.dump) / f"rank{rank}.safetensors"))
        import json

        from torch._dynamo.utils import counters
        blocks = [*self.model.encoder, *self.model.decoder]
        (Path(args.dump) / f"rank{rank}.json").write_text(json.dumps(
            {"blocks": len(blocks), "compiled_blocks": sum(hasattr(b, "compiled_forward") for b in blocks),
             "graphs": counters["stats"]["unique_graphs"]}))
    Trainer.fit = dumping_fit

cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
sys.exit(main(cli))
