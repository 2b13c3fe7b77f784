"""Faults injected into real jobs (issue 14.1, 14.2): 2 ZeRO-3 CPU ranks of `layerwise-dist distill` started
through the real `deepspeed` launcher, then a rank SIGKILLed at random moments (mostly while a checkpoint is
written), a shard truncated on disk, or SIGTERM/SIGINT sent to the CLI.

Every job here runs the same 200-step schedule and ends at `train.stop_at_step` (checkpointing every step),
so its per-step losses must equal those of one uninterrupted job, however often it was killed and resumed.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, VENV_BIN, run_env
from layerwise_dist.checkpoint import CheckpointStore

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

STOP_AT = 8
COMMON = [
    "distill",
    "--preset",
    "tiny",
    "--nproc",
    "2",
    "student.selection=uniform",
    "distill.layer_weighting=linear",
    "train.max_steps=200",
    "train.save_every=1",
    "eval.max_examples=8",
]
LOSS_KEYS = ("total", "ce", "kd", "align", "lr")


class Job:
    """`layerwise-dist distill ...` as a process: its log file, its process tree, its checkpoints."""

    def __init__(self, out: Path, *overrides: str) -> None:
        self.out = out
        self.log = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
        self.log_file = open(self.log, "w")  # noqa: SIM115 -- closed in finish()
        cmd = [str(VENV_BIN / "layerwise-dist"), *COMMON, f"output_dir={out}", *overrides]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=self.log_file, stderr=subprocess.STDOUT)
        self.store = CheckpointStore(out / "checkpoints")

    def tags(self) -> set[str]:
        folder = self.store.folder
        return {p.name for p in folder.glob("step*")} if folder.is_dir() else set()

    def wait_for(self, ready, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, (
                f"the job ended early (exit {self.proc.returncode}):\n{self.text()[-3000:]}"
            )
            assert time.monotonic() < end, f"timed out waiting:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # the CLI has exited
            return []

    def rank(self, r: int) -> psutil.Process:
        for p in self.tree():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "layerwise_dist.worker" in cmd and f"--local_rank={r}" in cmd:
                return p
        raise AssertionError(f"rank {r} not found among {[p.pid for p in self.tree()]}")

    def finish(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                for p in self.tree():
                    p.kill()
                self.proc.kill()
            self.log_file.close()
        return rc, time.monotonic() - t0

    def text(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log.read_text(errors="replace")

    def history(self) -> list[dict]:
        return json.loads((self.out / "train_history.json").read_text())


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _assert_same_losses(history: list[dict], reference: list[dict]) -> None:
    assert [h["step"] for h in history] == [h["step"] for h in reference]
    for a, b in zip(history, reference):
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])


def _assert_latest_complete(store: CheckpointStore) -> None:
    """`latest`, when present, names a complete checkpoint: the property a kill must never break."""
    latest = store.folder / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        assert store.check(store.folder / tag) == "", f"latest names {tag}: {store.check(store.folder / tag)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The per-step losses of the job run once, start to end, with no fault (and no checkpoint before the end:
    the faulted jobs save every step, so their losses equal these only if saving leaves training alone)."""
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    job = Job(out, f"train.stop_at_step={STOP_AT}", "train.save_every=0")
    rc, _ = job.finish(600)
    assert rc == 0, job.text()[-4000:]
    history = job.history()
    assert len(history) == STOP_AT
    return history


def _kill_trial(out: Path, rng: random.Random) -> dict:
    """One trial: (re)start the job with resume, SIGKILL one rank at a random moment around a checkpoint save.

    Returns what happened: the killed rank, whether the job had finished first, the tags skipped on the
    next resume because the kill left them incomplete."""
    before = CheckpointStore(out / "checkpoints").newest_complete()[0] if (out / "checkpoints").is_dir() else None
    job = Job(out, f"train.stop_at_step={STOP_AT}", "train.resume=true")
    # The n-th checkpoint this run starts, then a random delay: the kill lands inside a save (the
    # shards, the markers, `latest`, the student export) or in the next step's compute.
    nth = rng.randint(1, 3)
    delay = rng.uniform(0.0, 0.4) if rng.random() < 0.5 else rng.uniform(0.0, 2.0)  # half inside the shard writes
    victim = 1 if rng.random() < 0.75 else 0
    start_tags = job.tags()
    job.wait_for(lambda: len(job.tags() - start_tags) >= nth or job.proc.poll() is not None)
    time.sleep(delay)
    tree = job.tree()
    try:
        job.rank(victim).kill()
    except (AssertionError, psutil.NoSuchProcess):  # the job reached stop_at_step first: no fault this time
        rc, _ = job.finish(60)
        assert rc == 0, job.text()[-3000:]
        return {"finished": True}
    rc, seconds = job.finish(120)
    assert seconds < 60, f"the job took {seconds:.0f} s to end after rank {victim} was killed"
    assert _alive(tree) == [], f"survivors after a rank was killed: {_alive(tree)}"
    _assert_latest_complete(job.store)
    tag, skipped = job.store.newest_complete()
    return {
        "finished": rc == 0,
        "rc": rc,
        "seconds": seconds,
        "victim": victim,
        "nth": nth,
        "delay": round(delay, 2),
        "resume_from": tag,
        "previous": before,
        "skipped": skipped,
    }


def _kill_and_resume(tmp_path: Path, uninterrupted: list[dict], trials: int, seed: int) -> list[dict]:
    """Chains of kill -> resume -> kill ...; each chain ends with a resume that runs to stop_at_step,
    whose full loss history (every segment's steps, carried in the checkpoints) must equal the
    uninterrupted job's. Before that last resume the newest checkpoint's rank-1 optimizer shard is
    truncated on disk (as issue 14 saw it), so the resume must detect it and fall back."""
    rng = random.Random(seed)
    outcomes: list[dict] = []
    chain = 0
    while sum(1 for o in outcomes if not o.get("finished")) < trials:
        out = tmp_path / f"chain{chain}"
        while sum(1 for o in outcomes if not o.get("finished")) < trials:
            outcome = _kill_trial(out, rng)
            outcomes.append(outcome)
            if outcome.get("finished"):
                break
        store = CheckpointStore(out / "checkpoints")
        newest, _ = store.newest_complete()
        truncated = None
        complete = [p for p in store._tags() if not store.check(p)]
        if newest is not None and len(complete) >= 2 and newest != f"step{STOP_AT}":
            shard = next((store.folder / newest).glob("zero_pp_rank_1_*_optim_states.pt"))
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size * 4 // 5)
            truncated = newest
        job = Job(out, f"train.stop_at_step={STOP_AT}", "train.resume=true")
        rc, _ = job.finish(600)
        text = job.text()
        assert rc == 0, text[-4000:]
        if truncated:
            assert f"checkpoint {truncated}: rank 1's" in text and "falling back" in text, text[-4000:]
        _assert_same_losses(job.history(), uninterrupted)
        _assert_latest_complete(store)
        outcomes[-1]["truncated_before_resume"] = truncated
        chain += 1
    return outcomes


def test_rank_killed_during_saves_resumes_exactly(tmp_path, uninterrupted):
    """A seeded kill of a rank around a checkpoint save (the slow test below makes 20+); the resume, after the
    newest checkpoint's shard is truncated, falls back and continues the uninterrupted losses exactly."""
    # Seed 20: rank 0 killed 1.5 s after the job's third checkpoint began (the slow test kills rank 1 mostly).
    outcomes = _kill_and_resume(tmp_path, uninterrupted, trials=1, seed=20)
    assert sum(1 for o in outcomes if not o.get("finished")) == 1
    assert [o["victim"] for o in outcomes if not o.get("finished")] == [0]
    assert outcomes[-1]["truncated_before_resume"], outcomes  # the fallback past a damaged newest checkpoint ran
    print(json.dumps(outcomes, indent=1))


@pytest.mark.slow
def test_rank_killed_during_saves_many_trials(tmp_path, uninterrupted):
    """20+ seeded kills (rank 1 mostly, rank 0 sometimes) at random moments around saves."""
    outcomes = _kill_and_resume(tmp_path, uninterrupted, trials=20, seed=2024)
    killed = [o for o in outcomes if not o.get("finished")]
    assert len(killed) >= 20
    print(json.dumps(outcomes, indent=1))
    print(f"{len(killed)} kills, {sum(1 for o in killed if o['skipped'])} left an incomplete newest tag")


def _signal_test(tmp_path: Path, uninterrupted: list[dict], signum: int) -> None:
    out = tmp_path / "run"
    # A long schedule (stop_at_step=200 would take minutes): the signal, not the schedule, ends it.
    job = Job(out, "train.stop_at_step=0")
    job.wait_for(lambda: (out / "checkpoints" / "step2" / "rank1.done").exists())
    tree = job.tree()
    assert len(tree) >= 3, [p.cmdline() for p in tree]  # deepspeed.launcher.launch, 2 ranks
    job.proc.send_signal(signum)
    rc, seconds = job.finish(90)
    text = job.text()
    assert rc == 128 + signum, text[-4000:]
    assert seconds < 60, seconds
    assert _alive(tree) == [], f"survivors: {_alive(tree)}"
    stops = [line for line in text.splitlines() if line.startswith("error: StoppedBySignal:")]
    assert stops, text[-4000:]
    name = signal.Signals(signum).name
    step = int(stops[0].split(" at step ")[1].split()[0])
    assert f"stopped by {name} at step {step} of 200; checkpoint step{step} written" in stops[0]
    assert len(set(stops)) == 1, stops  # both ranks stopped at the same step
    store = CheckpointStore(out / "checkpoints")
    assert (store.folder / "latest").read_text().strip() == f"step{step}"
    assert store.check(store.folder / f"step{step}") == ""
    assert 2 <= step < STOP_AT, step
    resumed = Job(out, f"train.stop_at_step={STOP_AT}", "train.resume=true")
    rc, _ = resumed.finish(600)
    assert rc == 0, resumed.text()[-4000:]
    assert f"resumed from {store.folder / f'step{step}'} at step {step}" in resumed.text()
    _assert_same_losses(resumed.history(), uninterrupted)


def test_sigterm_stops_ranks_at_step_boundary_with_checkpoint(tmp_path, uninterrupted):
    """SIGTERM to `layerwise-dist`: every rank stops at the same step, checkpoints it, exits 143 within 60 s;
    no process of the tree survives; a resume continues the uninterrupted losses exactly."""
    _signal_test(tmp_path, uninterrupted, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_stops_ranks_at_step_boundary_with_checkpoint(tmp_path, uninterrupted):
    """The same for SIGINT (^C): exit 130."""
    _signal_test(tmp_path, uninterrupted, signal.SIGINT)


def test_truncated_shard_is_skipped(tmp_path):
    """No process needed: a tag whose shard lost bytes, or whose rank marker is missing, is not complete."""
    store = CheckpointStore(tmp_path)
    for step in (1, 2):
        tag = tmp_path / f"step{step}"
        tag.mkdir()
        for r in (0, 1):
            shard = tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            shard.write_bytes(b"x" * 100)
            (tag / f"rank{r}.done").write_text(
                json.dumps({"rank": r, "world_size": 2, "step": step, "files": {shard.name: 100}})
            )
    (tmp_path / "latest").write_text("step2")
    assert store.newest_complete() == ("step2", [])
    (tmp_path / "step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 80)
    assert store.newest_complete() == (
        "step1",
        ["step2: rank 1's zero_pp_rank_1_mp_rank_00_optim_states.pt has 80 of its 100 bytes"],
    )
    (tmp_path / "step1" / "rank1.done").unlink()
    tag, skipped = store.newest_complete()
    assert tag is None and skipped[1] == "step1: rank 1 of 2 never finished writing it (no rank1.done)"
    shutil.rmtree(tmp_path / "step2")
    store.prune()  # a single incomplete tag, no complete one: nothing to prune it in favour of
    assert (tmp_path / "step1").is_dir()


NAN_SCRIPT = """
import sys, torch
from layerwise_dist import DistillationTrainer, build_student, load_config
from layerwise_dist.checkpoint import TrainState
from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
from layerwise_dist.models.teacher import load_teacher, load_tokenizer, resolve_model_dir
from layerwise_dist.trainer import TrainingDivergedError

out = sys.argv[1]
cfg = load_config("tiny", ["train.lr=1e12", "train.warmup_steps=0", "train.grad_clip=0", f"output_dir={out}"])
tok = load_tokenizer(cfg.teacher)
data = tokenize_examples(build_examples(load_splits(cfg.data), "train", cfg.data, tok)[:2], tok, cfg.data)
batch = collate([data[i] for i in range(2)], tok.pad_token_id)
student, _ = build_student(resolve_model_dir(cfg.teacher), [0, 3])
trainer = DistillationTrainer(teacher_model=load_teacher(cfg.teacher), student_model=student, config=cfg)
runner = trainer.runner
nan = torch.tensor(float("nan"))
for saved in (False, True):
    if saved:  # one finite step, checkpointed as step 1
        trainer.train([batch], num_epochs=1)
        runner.checkpoints.save(runner.engine, TrainState(step=1))
    try:
        runner._check_finite(1, nan, {"ce": nan})
    except TrainingDivergedError as e:
        print("MESSAGE", e)
"""


def test_non_finite_message_names_the_last_complete_checkpoint(tmp_path):
    """The divergence message names the checkpoint a resume would load, or says there is none (issue 14)."""
    out = tmp_path / "run"
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", NAN_SCRIPT, str(out)],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    messages = [line for line in done.stdout.splitlines() if line.startswith("MESSAGE ")]
    assert len(messages) == 2, done.stdout[-2000:]
    assert f"no complete checkpoint in {out / 'checkpoints'} to resume from" in messages[0]
    assert f"last complete checkpoint: {out / 'checkpoints' / 'step1'}" in messages[1]
