"""Data-parallel training on 2 CPU processes (gloo), launched like torchrun launches them: every
test starts its own subprocesses running the real command line on the toy tasks (dist_script.py).

The runs use a constant learning rate after warm-up (min_lr_ratio=1), so a run stopped at step 3
and resumed to step 6 follows the same schedule as one run of 6 steps; 2 ranks with global batch
B, data parallel or expert parallel (each rank holding 2 of the tiny preset's 4 routed experts),
must give the losses (MoE aux losses included) and weights of 1 process with batch B.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from generalist.train.distributed import check_batch
from generalist.train.mixture import MixtureSampler

sys.path.insert(0, str(Path(__file__).parent))
import toy_tasks  # noqa: E402

SCRIPT = Path(__file__).parent / "dist_script.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
OPTIONS = ["batch_size=8", "ckpt_every=3", "log_every=1", "vocab_size=300", "warmup=2", "lr=3e-3", "min_lr_ratio=1.0"]


def _train_args(out, steps, resume=False, extra=()):
    args = ["train", "--preset", "tiny", "--out", str(out), "--steps", str(steps), "--no-eval"]
    for option in [*OPTIONS, *extra]:
        args += ["--set", option]
    return args + (["--resume"] if resume else [])


def _one(out, steps, resume=False):
    done = subprocess.run([sys.executable, str(SCRIPT), "--", *_train_args(out, steps, resume)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


MODES = {"ddp": [], "expert_parallel": ["expert_parallel=true"], "fsdp": ["fsdp=true"],
         "fsdp+expert_parallel": ["fsdp=true", "expert_parallel=true"]}


def _torchrun(out, steps, resume=False, dump=None, mode="ddp", extra=(), timeout=120):
    """2 ranks under the real launcher."""
    dump_args = ["--dump", str(dump)] if dump else []
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), *dump_args, "--", *_train_args(out, steps, resume, [*MODES[mode], *extra])],
                          env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(script_args, world=2):
    """The ranks as plain subprocesses with torchrun's environment (no launcher to kill the
    survivors when one rank dies: the trainer must notice by itself)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(SCRIPT), *script_args],
                             env={**ENV, "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def _records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _state(run):
    return json.loads((Path(run) / "checkpoint" / "state.json").read_text())


def _assert_same_training(a, b, steps):
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=2e-5, atol=1e-6)
    assert [r["tokens"] for r in rb] == [r["tokens"] for r in ra]
    # the MoE router losses: global under torchrun, as one process computes them
    assert all(r["aux_loss"] > 0 for r in ra)
    np.testing.assert_allclose([r["aux_loss"] for r in rb], [r["aux_loss"] for r in ra], rtol=2e-5, atol=1e-7)
    for x, y in zip(ra, rb):
        assert x["task_loss"].keys() == y["task_loss"].keys()
        np.testing.assert_allclose([y["task_loss"][k] for k in x["task_loss"]], list(x["task_loss"].values()),
                                   rtol=2e-5, atol=1e-6)
    sa, sb = _state(a), _state(b)
    assert sb["step"] == sa["step"] == steps and sb["sampler"] == sa["sampler"]
    assert sb["routing"] == sa["routing"]  # global counts, summed over the ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 8, 6 steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    _one(out, 6)
    return out


EXPERT_STACKS = (".moe.w1_EDF", ".moe.w3_EDF", ".moe.w2_EFD")


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_equal_one_process_and_save_a_one_process_checkpoint(reference, tmp_path, mode):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    _torchrun(out, 6, dump=dump, mode=mode)
    _assert_same_training(reference, out, 6)
    assert (out / "tensorboard").is_dir() and not list(out.glob("*rank*"))  # rank 0 alone writes the run
    # rank 0 saved the unwrapped model: no DDP prefixes, and the very weights the ranks hold
    # (expert parallel: each rank its half of every routed-expert stack)
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert not [k for k in saved if k.startswith("module.")]
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert saved.keys() == rank0.keys() == rank1.keys()
    stacks = [k for k in saved if k.endswith(EXPERT_STACKS)]
    assert len(stacks) == 6 and all(saved[k].shape[0] == 4 for k in stacks)  # 2 layers x 3 stacks of 4 experts
    for k in saved:
        if "expert_parallel" in mode and k in stacks:
            assert rank0[k].shape[0] == rank1[k].shape[0] == 2
            assert torch.equal(saved[k], torch.cat([rank0[k], rank1[k]])), k
        else:
            assert torch.equal(saved[k], rank0[k]) and torch.equal(saved[k], rank1[k]), k
    # and the weights (and optimizer moments) of one process, to fp32 rounding
    ref_weights = load_file(str(reference / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(saved[k], ref_weights[k], rtol=1e-4, atol=1e-6) for k in saved)
    opt, ref_opt = (torch.load(run / "checkpoint" / "optimizer.pt", weights_only=True) for run in (out, reference))
    assert opt["state"].keys() == ref_opt["state"].keys()
    for i, st in ref_opt["state"].items():
        for key, v in st.items():
            assert opt["state"][i][key].shape == v.shape and torch.allclose(opt["state"][i][key], v, rtol=1e-3,
                                                                            atol=1e-8), (i, key)
    state = _state(out)
    assert len(state["rng_ranks"]) == 2 and state["rng"] == state["rng_ranks"][0]
    # one process loads it for prediction (`generalist predict` and Python) with the saved weights
    from generalist.cli import main
    from generalist.infer.generalist import Generalist

    g = Generalist.load(out, device="cpu")
    assert all(torch.equal(v, saved[k]) for k, v in g.model.state_dict().items())
    answer = subprocess.run([sys.executable, "-m", "generalist", "predict", str(out), "--task", "echo", "--text",
                             "red blue", "--device", "cpu"], env=ENV, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == g.predict(task="echo", text="red blue")
    assert main(["predict", str(out), "--task", "bars", "--image", str(_bar_image(tmp_path))]) == 0


def _bar_image(tmp_path):
    path = tmp_path / "bar.npy"
    img = np.zeros((8, 8), dtype=np.float32)
    img[:, 3] = 1.0
    np.save(path, img)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_two_rank_checkpoint_resumes_in_one_process(reference, tmp_path, mode):
    out = tmp_path / "run"
    _torchrun(out, 3, mode=mode)
    assert _state(out)["step"] == 3
    _one(out, 6, resume=True)
    _assert_same_training(reference, out, 6)


@pytest.mark.parametrize("mode", MODES)
def test_one_process_checkpoint_resumes_on_two_ranks(reference, tmp_path, mode):
    out = tmp_path / "run"
    _one(out, 3)
    assert "rng_ranks" not in _state(out)
    _torchrun(out, 6, resume=True, mode=mode)
    _assert_same_training(reference, out, 6)


@pytest.mark.parametrize("mode", ["expert_parallel", "fsdp", "fsdp+expert_parallel"])
def test_ranks_with_an_empty_slice_still_match_one_process(tmp_path, mode):
    """Global batch 4 on 2 ranks: some steps leave a rank without generative examples, or without
    contrastive pairs while the other has some (checked below on the very picks the runs draw);
    that rank must still run every block, forward and backward, so that the token exchanges, the
    global router losses and FSDP's gathers and reduce-scatters meet on both ranks and match one
    process."""
    steps, extra = 8, ["batch_size=4", "ckpt_every=8", "seed=5"]
    sampler = MixtureSampler({name: spec["train"] for name, spec in toy_tasks.MIXTURE.items()}, 2.0, 5)
    tasks = toy_tasks.TASKS
    slices = [(picks[:2], picks[2:]) for picks in (sampler.sample(4) for _ in range(steps))]

    def count(kind, picks):
        return sum(getattr(tasks[t], kind) for t, _ in picks)

    assert any(count("generative", a) * count("generative", b) == 0 < count("generative", a + b) for a, b in slices)
    assert any(count("contrastive", a) * count("contrastive", b) == 0 and count("contrastive", a + b) >= 2
               for a, b in slices)
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run([sys.executable, str(SCRIPT), "--", *_train_args(one, steps, extra=extra)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), "--", *_train_args(two, steps, extra=extra + MODES[mode])],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_training(one, two, steps)


@pytest.mark.parametrize("mode", ["fsdp+expert_parallel", *[pytest.param(m, marks=pytest.mark.slow)
                                                           for m in ("ddp", "fsdp", "expert_parallel")]])
def test_compiled_blocks_on_two_ranks_train_like_one_eager_process(reference, tmp_path, mode):
    """compile=true under torchrun: every rank compiles its blocks after DDP, FSDP2 or expert
    parallelism has converted them (the MoE collectives run eagerly between the graphs), and the
    run logs the losses and saves the weights of one eager process, to float rounding (fused
    kernels add in another order); dynamo warns of nothing (no unplanned graph break, no
    recompile limit reached)."""
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    done = _torchrun(out, 6, dump=dump, mode=mode, extra=["compile=true"], timeout=400)
    ra, rb = _records(reference), _records(out)
    assert [r["step"] for r in rb] == list(range(1, 7)) and [r["tokens"] for r in rb] == [r["tokens"] for r in ra]
    np.testing.assert_allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-4)
    saved, ref_weights = (load_file(str(run / "checkpoint" / "model.safetensors")) for run in (out, reference))
    assert saved.keys() == ref_weights.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], ref_weights[k], rtol=1e-3, atol=1e-5, msg=k)
    for r in range(2):
        info = json.loads((dump / f"rank{r}.json").read_text())
        assert info["blocks"] == info["compiled_blocks"] > 0 and info["graphs"] >= 2, info
    assert "torch/_dynamo" not in done.stderr and "torch._dynamo" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("failure,timeout", [("die", 30), ("hang", 4)])
def test_a_failed_rank_stops_the_other_with_a_clear_error(tmp_path, failure, timeout):
    """Rank 1 is SIGKILLed (or stops answering) after step 2; rank 0 must exit with one clear
    line: well within the process-group timeout for a dead peer (its connection closes), after
    the timeout for a silent one (start-up takes under 10 s of the 60 allowed here)."""
    ranks = _spawn_ranks([f"--{failure}-at", "2", "--",
                          *_train_args(tmp_path / "run", 20, extra=[f"dist_timeout_s={timeout}"])])
    start = time.time()
    try:
        _, err = ranks[0].communicate(timeout=90)
        rank0_done = time.time() - start
        if failure == "die":
            assert ranks[1].wait(timeout=30) == -9
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert ranks[0].returncode == 1, err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]  # the progress bar redraws with \r
    assert lines[-1].startswith("generalist train: error: rank 0 of 2: a collective failed or timed out"), err
    assert "another rank most likely died or hung" in lines[-1] and "Traceback" not in err, err
    assert rank0_done < (timeout if failure == "die" else 60)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(reference, tmp_path):
    """SIGTERM reaching rank 1 alone after step 2: both ranks stop after that step (the flag
    travels with the step's all-reduce), join the checkpoint and exit with 143; one process resumes
    it to the losses and state of the uninterrupted run."""
    out = tmp_path / "run"
    ranks = _spawn_ranks(["--term-at", "2", "--", *_train_args(out, 6, extra=["dist_timeout_s=30"])])
    try:
        errs = [p.communicate(timeout=90)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in ranks] == [143, 143], errs
    lines = [line for line in re.split(r"[\r\n]+", errs[0]) if line.strip()]
    assert lines[-1].startswith("SIGTERM received: stopped at step 2 of 6"), errs[0]
    assert _state(out)["step"] == 2 and len(_records(out)) == 2
    _one(out, 6, resume=True)
    _assert_same_training(reference, out, 6)


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_a_step_skipped_between_accumulated_micro_batches_leaves_nothing_behind(tmp_path, mode):
    """accum=2 and a NaN loss on step 2's second micro-batch: the step is skipped, and the next
    one trains on its own gradient alone, as in one process (under FSDP, the first micro-batch's
    gradient once stayed on the unsharded parameters, out of zero_grad's reach, and was added to
    step 3's)."""
    extra = ["accum=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run([sys.executable, str(SCRIPT), "--nan-at", "3", "--", *_train_args(one, 4, extra=extra)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), "--nan-at", "3", "--", *_train_args(two, 4, extra=extra + MODES[mode])],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ra, rb = _records(one), _records(two)
    assert _state(one)["skipped"] == _state(two)["skipped"] == 1
    finite = [(a, b) for a, b in zip(ra, rb) if math.isfinite(a["grad_norm"])]
    assert [a["step"] for a, _ in finite] == [1, 3, 4], ra
    np.testing.assert_allclose([b["grad_norm"] for _, b in finite], [a["grad_norm"] for a, _ in finite], rtol=1e-4)
    np.testing.assert_allclose([b["loss"] for _, b in finite], [a["loss"] for a, _ in finite], rtol=2e-5, atol=1e-6)


def test_extra_contrastive_pairs_on_two_ranks_equal_one_process(tmp_path):
    """contrastive_batch: each rank embeds its half of the extra pairs; the global contrastive
    loss over all of them is one process's."""
    extra = ["contrastive_batch=4"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--", *_train_args(tmp_path / "one", 4, extra=extra)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _torchrun(tmp_path / "two", 4, extra=extra)
    _assert_same_training(tmp_path / "one", tmp_path / "two", 4)
    assert all("contrastive" in r["task_loss"] for r in _records(tmp_path / "two"))
    assert _state(tmp_path / "two")["con_sampler"] == _state(tmp_path / "one")["con_sampler"]


def test_batch_must_split_evenly_and_module_entry_point():
    check_batch(8, 2)
    with pytest.raises(ValueError, match=r"batch_size \(9\) must be a multiple of the number of processes \(2\)"):
        check_batch(9, 2)
    with pytest.raises(ValueError, match=r"contrastive_batch \(3\) must be a multiple of the number of processes"):
        check_batch(8, 2, 3)
    done = subprocess.run([sys.executable, "-m", "generalist", "train", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--resume" in done.stdout


def test_expert_parallel_with_indivisible_experts_is_refused_before_overwrite_deletes_the_run(tmp_path):
    """n_routed=3 on 2 ranks cannot be sharded by expert: refused by option name before the data is
    built and before --overwrite deletes the run in --out (it used to be refused only once the
    model was built, with the run already gone)."""
    out = tmp_path / "run"
    _torchrun(out, 2)
    args = [*_train_args(out, 2, extra=["expert_parallel=true", "model.n_routed=3"]), "--overwrite"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), "--", *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: expert_parallel: model.n_routed (3) must be a multiple of the number of processes (2)" in done.stderr
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
