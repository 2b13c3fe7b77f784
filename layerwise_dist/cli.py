"""``layerwise-dist``: the command line.

Run commands (``fisher``, ``distill``, ``evaluate``, ``pipeline``) take
``--preset``, ``--ds_config``, ``--nproc`` and ``key=value`` overrides. With
``--nproc`` > 1 (outside a launcher) they start that many ranks through DeepSpeed's per-node
launcher (``deepspeed.launcher.launch``) on 127.0.0.1; inside ``deepspeed``/``torchrun``/SLURM they
run on the ranks that launcher made.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .commands import DESCRIPTIONS, job
from .worker import add_run_arguments


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _nproc_limit() -> tuple[int, str]:
    """The most ranks this machine runs one per device: CUDA devices, or CPU cores without CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA devices"
    return os.cpu_count() or 1, "CPU cores"


def _check_nproc(args: argparse.Namespace) -> int:
    """``--nproc`` as given (1..N), or the default; a ConfigError names the limit and the override."""
    from .config import ConfigError

    if args.nproc is None:
        return _default_nproc()
    limit, what = _nproc_limit()
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1; got {args.nproc}")
    if args.nproc > limit and not args.oversubscribe:
        raise ConfigError(
            f"--nproc {args.nproc} is more than the {limit} {what} of this machine; "
            "add --oversubscribe to run several ranks per device/core anyway"
        )
    return args.nproc


def _inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def launch(command: str, args: argparse.Namespace) -> int:
    """Resolve and check the config here (one clear error, before any process starts), then start the ranks.

    The ranks get the resolved config itself (``--config <output_dir>/config.yaml``), not
    the preset and overrides to parse again.
    """
    from .ds_config import ds_config_path
    from .errors import known_errors, one_line
    from .models.teacher import resolve_model_dir
    from .preflight import check_memory, check_student_choice
    from .worker import resolve, run_job

    try:
        nproc = _check_nproc(args)
        cfg = resolve(args)
        ds_config_path(cfg.ds_config)
        resolve_model_dir(cfg.teacher)  # a wrong teacher path is one line before any rank or file
        if command == "ablation" and not cfg.train.resume:  # finished cells and stages are reused, never redone
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
        if command in ("distill", "pipeline", "ablation"):
            check_student_choice(cfg)  # before any rank starts and before the Fisher pass
            check_memory(cfg, nproc)  # the planner: stop now when the placement cannot fit
    except known_errors() as e:  # ConfigError included
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if _inside_launcher():
        return run_job(job(command), cfg)
    from .distributed import QUIET_ENV
    from .runlock import TOKEN_ENV, RunLock

    try:  # before anything is written into output_dir: a second run must not touch the first one's files
        lock = RunLock(cfg.output_dir).acquire()
    except known_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if not getattr(args, "verbose", False):
        os.environ[QUIET_ENV] = "1"  # the ranks inherit it (distributed.quiet_third_party)
    try:
        os.environ[TOKEN_ENV] = lock.token  # the job's rank 0 recognises the lock as its own
        if nproc <= 1:
            return run_job(job(command), cfg)
        from .recipes.session import check_resume_config

        try:  # here, before the ranks' config.yaml replaces the earlier sitting's, which the check reads
            check_resume_config(cfg)
        except known_errors() as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        return _start_ranks(command, cfg, nproc, args)
    finally:
        lock.release()


def rank_env(environ: Mapping[str, str], cpu: bool) -> dict[str, str]:
    """The environment of the ranks ``layerwise-dist --nproc N`` starts: ``environ`` plus, on CPU, the defaults
    a shared machine needs (what ``environ`` sets wins)."""
    from .distributed import CPU_ALLOCATOR_ENV

    env = dict(environ)
    if cpu:
        # One thread per rank: two ranks on two cores crawl when each spawns a full pool.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning in every process
        for key, value in CPU_ALLOCATOR_ENV.items():  # big tensors reused, not page-faulted anew every step
            env.setdefault(key, value)
    return env


def launch_devices(nproc: int, environ: Mapping[str, str], gpu: bool) -> list[int | str]:
    """The device ids the ranks get: on GPU the first ``nproc`` of ``CUDA_VISIBLE_DEVICES`` when it names
    that many (a SLURM job's or a user's choice; DeepSpeed's launcher sets the ranks' ``CUDA_VISIBLE_DEVICES``
    to these ids, and ``deepspeed --num_gpus N`` would give 0..N-1 whatever was visible), else 0..nproc-1."""
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpu and len(visible) >= nproc:
        return [int(d) if d.isdigit() else d for d in visible[:nproc]]
    return list(range(nproc))


def launch_command(command: str, config: Path, port: int, quiet: bool, devices: list) -> list[str]:
    """DeepSpeed's per-node launcher (``deepspeed.launcher.launch``: what the ``deepspeed`` command runs on
    one node) on 127.0.0.1 for one rank of ``layerwise_dist.worker`` per device id, each given ``config``.

    It is started directly, not through the ``deepspeed`` command: on one node that command only encodes the
    node's devices (``--world_info``) and starts this same launcher, after importing all of DeepSpeed once
    more (5-6 s here). And it is started through :mod:`layerwise_dist.ds_launch`, which runs it unchanged in a
    process where DeepSpeed's import does not pull in MLflow (2.5 s of the launcher's start here)."""
    import base64
    import json

    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(devices)}).encode()).decode()
    return [
        sys.executable,
        "-u",
        "-m",
        "layerwise_dist.ds_launch",
        f"--world_info={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *(["--quiet"] if quiet else []),  # the launcher's own INFO lines
        "--module",
        "layerwise_dist.worker",
        command,
        "--config",
        str(config),
    ]


def _start_ranks(command: str, cfg: Any, nproc: int, args: argparse.Namespace) -> int:
    """The ranks through DeepSpeed's launcher (:func:`launch_command`), every one given the resolved config."""
    from .distributed import QUIET_ENV, free_port

    resolved = Path(cfg.output_dir) / "config.yaml"
    cfg.save(resolved)
    import torch

    gpu = torch.cuda.is_available()
    env = rank_env(os.environ, cpu=not gpu)
    devices = launch_devices(nproc, os.environ, gpu)
    cmd = launch_command(command, resolved, args.master_port or free_port(), env.get(QUIET_ENV) == "1", devices)
    print("launching:", " ".join(cmd), flush=True)
    return _run_launcher(cmd, env)


# After SIGTERM/SIGINT, how long the ranks get to reach a step boundary, checkpoint and exit
# before the whole launcher tree is killed (LAYERWISE_DIST_STOP_TIMEOUT overrides, in seconds).
STOP_TIMEOUT_S = 120.0


def _run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher in a process group of its own and own that group until it is empty.

    SIGTERM/SIGINT here are forwarded to the ranks themselves (they stop at the next step
    boundary, checkpoint and exit 128 + signum; the launcher then exits by itself), not to
    the launcher: ``deepspeed.launcher.launch`` passes a signal on as SIGTERM and SIGKILLs
    every rank 30 s later, whatever it is doing. After the timeout, or on a
    second signal, the group is SIGKILLed. Whatever is left in the group once the
    launcher exited is an orphan and is killed too. Returns the launcher's exit code, or
    128 + signum when a signal stopped the job.
    """
    import signal
    import time

    timeout = float(os.environ.get("LAYERWISE_DIST_STOP_TIMEOUT", STOP_TIMEOUT_S))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own group: the terminal's ^C reaches us only
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            print(
                f"layerwise-dist: {name}: the ranks stop at the next step boundary and checkpoint "
                f"(killed after {timeout:.0f} s; send it again to kill them now)",
                file=sys.stderr,
                flush=True,
            )
            _signal_ranks(proc.pid, signum)
        else:
            print(f"layerwise-dist: {name} again: killing the ranks", file=sys.stderr, flush=True)
            _kill_group(proc.pid)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + timeout
            if deadline is not None and time.monotonic() > deadline:
                print(f"layerwise-dist: the ranks did not stop within {timeout:.0f} s: killed", file=sys.stderr)
                _kill_group(proc.pid)
                deadline = float("inf")
        # The launcher is gone: anything left in its group (a rank it lost track of, a rank's child) is an orphan.
        _wait_group(proc.pid, 10.0)
    finally:
        if proc.poll() is None:  # an exception here (not a signal): leave nothing behind
            _kill_group(proc.pid)
            proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else rc


def _signal_ranks(launcher_pid: int, signum: int) -> None:
    """Send ``signum`` to the ranks (the children of ``deepspeed.launcher.launch``); before they exist, to the group."""
    import psutil

    try:
        ranks = psutil.Process(launcher_pid).children()
    except psutil.Error:
        ranks = []
    if not ranks:  # still starting: nothing to checkpoint yet, the launcher passes it on
        _kill_group(launcher_pid, signum)
        return
    for p in ranks:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass


def _kill_group(pgid: int, signum: int | None = None) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL if signum is None else signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group(pgid: int, seconds: float) -> None:
    """Wait until no process is left in group ``pgid``; SIGKILL what remains after ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > end:
            _kill_group(pgid)
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="layerwise-dist",
        description="Fisher-guided layerwise distillation of LLM recommenders (DeepSpeed, Ray, MLflow).",
    )
    parser.add_argument("--version", action="version", version=f"layerwise_dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = {"epilog": _keys_epilog(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    for name in DESCRIPTIONS:
        p = sub.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name], **keys)
        add_run_arguments(p)
        p.add_argument(
            "--nproc", type=int, default=None, help="ranks to start, 1..devices (default: CUDA devices, or 2 on CPU)"
        )
        p.add_argument(
            "--oversubscribe",
            action="store_true",
            help="allow --nproc above the CUDA devices / CPU cores of this machine",
        )
        p.add_argument("--master_port", type=int, default=0, help="rendezvous port (default: a free one)")
        p.add_argument(
            "--verbose",
            action="store_true",
            help="show the launcher's and third-party libraries' logs and loading bars (hidden by default)",
        )
        if name == "evaluate":
            _add_evaluate_arguments(p)
    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from .data import add_prepare_arguments

    prep = data_sub.add_parser(
        "prepare",
        help="reviews + metadata -> splits (parquet) + stats.json",
        description="reviews + metadata -> splits",
    )
    add_prepare_arguments(prep)
    _add_show_prompt_parser(data_sub)
    show = sub.add_parser("config", help="print the resolved configuration (YAML) or every key with its help", **keys)
    show.add_argument("--preset", default="default")
    show.add_argument("--keys", action="store_true", help="list every key with its default and help")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    exp = sub.add_parser(
        "export",
        help="a DeepSpeed checkpoint folder -> a Hugging Face model folder (with a model card)",
        description="Consolidate a DeepSpeed checkpoint (any ZeRO stage and rank count) into a HF model folder.",
    )
    exp.add_argument(
        "checkpoint_dir", help="folder holding 'latest' and the tag folders, e.g. results/demo/checkpoints"
    )
    exp.add_argument("--out", required=True, help="the HF folder to write (replaced atomically)")
    exp.add_argument("--tag", default=None, help="checkpoint tag, e.g. step40 (default: the one 'latest' names)")
    exp.add_argument(
        "--model-config", default=None, help="folder with the model's config.json/tokenizer (default: <run>/student)"
    )
    trk = sub.add_parser("tracking", help="tracking utilities")
    trk_sub = trk.add_subparsers(dest="tracking_command", required=True)
    rep = trk_sub.add_parser(
        "replay",
        help="send a run's tracking buffer (left while MLflow was unreachable) to the server",
        description="Replay tracking_buffer*.jsonl in order, with the original steps and timestamps.",
    )
    rep.add_argument("buffer", help="the buffer file, e.g. results/demo/tracking_buffer.jsonl")
    rep.add_argument("--tracking-uri", default=None, help="target store (default: the one the run was using)")
    rep.add_argument("--end-status", default="FAILED", help="status of a run whose buffer has no end record")
    rec = sub.add_parser(
        "recommend",
        help="top-k items for a user from a saved model",
        description="Retrieval (co-occurrence + popularity, serve.*) proposes candidates; the model re-ranks them.",
        **keys,
    )
    rec.add_argument("--model", required=True, help="model folder (e.g. results/demo/student) or embedded:smollm2")
    rec.add_argument("--user", required=True, help="user_id")
    rec.add_argument("--category", default="All_Beauty", help="category of the user (default: All_Beauty)")
    rec.add_argument("--top-k", type=int, default=3, help="number of items (default: 3)")
    rec.add_argument(
        "--history",
        default=None,
        help="comma-separated item ids the user interacted with, oldest first, for a user the data does not "
        "know ('' = a cold user: popular items re-ranked); default: the data's record of --user",
    )
    rec.add_argument("--preset", default="default", help="preset whose data.* section says where the data is")
    rec.add_argument("overrides", nargs="*", metavar="key=value")

    _add_plan_parser(sub)
    _add_compare_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "data" and args.data_command == "show-prompt":
        return _show_prompt(args)
    if args.command == "evaluate":
        args.overrides = [*args.overrides, *_evaluate_overrides(args)]
    if args.command == "plan":
        return _plan(args)
    if args.command in DESCRIPTIONS:
        return launch(args.command, args)
    if args.command == "data":
        from .data import run_prepare

        return run_prepare(args)
    if args.command == "config":
        from .config import ConfigError, help_text, load_config

        if args.keys:
            print(help_text())
            return 0
        try:
            import yaml

            print(yaml.safe_dump(load_config(args.preset, args.overrides).to_dict(), sort_keys=False), end="")
        except ConfigError as e:
            print(f"error: ConfigError: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "recommend":
        return _recommend(args)
    if args.command == "export":
        return _export(args)
    if args.command == "tracking":
        return _tracking_replay(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``evaluate`` that are shorthands of config keys (they travel to the ranks in config.yaml)."""
    p.add_argument("--candidates", default=None, help="fixed candidate file (user<TAB>item ids): eval.candidates")
    p.add_argument("--candidates-format", default=None, help="format of --candidates: llmrank (eval.candidates_format)")
    p.add_argument("--num-candidates", type=int, default=None, help="candidates per example (data.num_candidates)")
    p.add_argument(
        "--include-target",
        action="store_true",
        help="the lists already hold the target: first N as given, unshuffled (eval.include_target=true)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=None,
        choices=["random", "popularity"],
        help="score only this baseline (repeatable), no model: eval.baselines=[...] eval.models=false",
    )
    p.add_argument("--permutations", type=int, default=None, help="candidate orders per example (eval.permutations)")


def _evaluate_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.candidates is not None:
        out.append(f"eval.candidates={args.candidates}")
    if args.candidates_format is not None:
        out.append(f"eval.candidates_format={args.candidates_format}")
    if args.num_candidates is not None:
        out.append(f"data.num_candidates={args.num_candidates}")
    if args.include_target:
        out.append("eval.include_target=true")
    if args.baseline:
        out += [f"eval.baselines=[{','.join(dict.fromkeys(args.baseline))}]", "eval.models=false"]
    if args.permutations is not None:
        out.append(f"eval.permutations={args.permutations}")
    return out


def _add_show_prompt_parser(data_sub: argparse._SubParsersAction) -> None:
    sp = data_sub.add_parser(
        "show-prompt",
        help="print the exact text a model reads for one user (system prompt and chat template included)",
        description="Render one user's example exactly as evaluation tokenizes it: stdout is the text, stderr the facts.",
    )
    sp.add_argument("--user", required=True, help="user_id")
    sp.add_argument("--preset", default="default", help="preset name or YAML (data.*, teacher.* for the tokenizer)")
    sp.add_argument("--split", default=None, choices=["test", "valid"], help="default: eval.split")
    sp.add_argument("--candidates", default=None, help="a fixed candidate file (eval.candidates)")
    sp.add_argument("--include-target", action="store_true", help="eval.include_target=true")
    sp.add_argument("overrides", nargs="*", metavar="key=value")


def _show_prompt(args: argparse.Namespace) -> int:
    def action() -> None:
        from .config import load_config
        from .data import load_splits
        from .data.candidates import example_for_user
        from .data.prompts import rendered_text
        from .models.teacher import load_tokenizer

        overrides = list(args.overrides)
        if args.candidates:
            overrides.append(f"eval.candidates={args.candidates}")
        if args.include_target:
            overrides.append("eval.include_target=true")
        cfg = load_config(args.preset, overrides)
        tokenizer = load_tokenizer(cfg.teacher)
        example = example_for_user(load_splits(cfg.data), cfg, args.user, args.split or cfg.eval.split, tokenizer)
        d = cfg.data
        text = rendered_text(
            example, tokenizer, d.formulation, system_prompt=d.system_prompt, category_phrase=d.category_phrase
        )
        print(
            f"# user {example.user_id}, {example.split}: target {example.target} at index {example.target_index} of "
            f"{len(example.candidates)} candidates; formulation {d.formulation}; tokenizer {cfg.teacher.model}; "
            f"data.system_prompt={d.system_prompt!r}",
            file=sys.stderr,
        )
        sys.stdout.write(text if text.endswith("\n") else text + "\n")

    return _one_line_errors(action)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser(
        "compare",
        help="models side by side on the same users (--models A B ...: quality with 95%% CIs, latency, memory, "
        "Fisher profile -> table), or the paired difference A - B of two per-example files",
        description="--models A B ... [key=value ...]: every model (registry name, tiny:<arch>, HF folder, .gguf; "
        "LABEL=SPEC names a row) scored on the same users, candidates and seed -> compare.md/.csv/.png/.json in "
        "--out (and MLflow with tracking.enabled=true); key=value items among --models are config overrides. "
        "A B (two per_example/*.parquet files): paired bootstrap over the examples both files score.",
    )
    cp.add_argument(
        "a", nargs="?", help="per-example parquet of ranker A, e.g. results/run/per_example/student.parquet"
    )
    cp.add_argument("b", nargs="?", help="per-example parquet of ranker B")
    cp.add_argument("rest", nargs="*", help=argparse.SUPPRESS)  # --models: key=value given after other options
    cp.add_argument("--models", nargs="+", default=None, metavar="MODEL", help="models to compare (and key=value)")
    cp.add_argument("--preset", default="default", help="--models: preset for data.*, eval.*, fisher.*, teacher.*")
    cp.add_argument("--out", default="results/compare", help="--models: folder of the table files")
    cp.add_argument("--split", default=None, help="--models: test or valid (default: eval.split)")
    cp.add_argument("--latency-examples", type=int, default=8, help="--models: users timed one per request")
    cp.add_argument("--no-fisher", action="store_true", help="--models: skip the Fisher profiles")
    cp.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20], help="cut-offs K (default 1 5 10 20)")
    cp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    cp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cp.add_argument("--json", default=None, help="also write the result to this JSON file")


def _compare(args: argparse.Namespace) -> int:
    import json

    from .evaluation import compare_per_example

    if args.models:
        args.models = [*args.models, *(x for x in (args.a, args.b) if x), *args.rest]
        return _compare_models(args)
    if not (args.a and args.b) or args.rest:
        print("error: compare needs --models A B ... or exactly two per-example files A B", file=sys.stderr)
        return 2

    def action() -> None:
        out = compare_per_example(args.a, args.b, args.ks, n_boot=args.n_boot, seed=args.seed)
        print(f"A = {out['a']}\nB = {out['b']}\n{out['n']} paired examples, 95% paired bootstrap intervals")
        print(f"{'metric':<9} {'A':>8} {'B':>8} {'A - B':>8}  95% CI")
        for name, m in out["metrics"].items():
            lo, hi = m["ci95"]
            print(f"{name:<9} {m['a']:8.4f} {m['b']:8.4f} {m['difference']:+8.4f}  [{lo:+.4f}, {hi:+.4f}]")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    try:
        return _one_line_errors(action)
    except ValueError as e:
        from .errors import one_line

        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def _compare_models(args: argparse.Namespace) -> int:
    from .compare import run_compare, split_models_and_overrides
    from .config import load_config

    def action() -> None:
        models, overrides = split_models_and_overrides(args.models)
        cfg = load_config(args.preset, overrides)
        result = run_compare(models, cfg, args.out, args.split, args.latency_examples, not args.no_fisher)
        print(result["setup"] + "\n\n" + result["table"] + "\nfiles: " + ", ".join(result["files"]))

    return _one_line_errors(action)


def _keys_epilog() -> str:
    """Every config key with its default and help line, for the --help of commands taking key=value."""
    from .config import help_text

    return "config keys (key=value; default shown after '='):\n" + help_text()


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "plan",
        help="per-rank memory of a distillation run from a model config alone (no weights), and what fits",
        description="Per-rank memory of teacher, student states and activations for 1-16 ranks (layerwise_dist.planner).",
    )
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="teacher.model: a HF folder, embedded:smollm2 or tiny")
    src.add_argument("--config-json", help="a Hugging Face config.json")
    src.add_argument("--preset", help="a built-in shape: llama3-8b")
    pl.add_argument("--student-layers", type=int, default=8)
    pl.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    pl.add_argument("--seq", type=int, default=768, help="tokens per sequence")
    pl.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute/training dtype")
    pl.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    pl.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"], help="teacher, for the verdicts")
    pl.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GB")
    pl.add_argument("--host-mem", default=None, help="host memory per node, e.g. 1TB")
    pl.add_argument("--ranks-per-node", type=int, default=8)
    pl.add_argument("--json", default=None, help="also write every estimate to this JSON file")


def _plan(args: argparse.Namespace) -> int:
    import json

    from .errors import known_errors, one_line
    from .planner import PlanError, plan, plan_to_dict, render_plan

    try:
        if args.model:
            from .config import TeacherConfig
            from .models.teacher import resolve_model_dir

            source, name = resolve_model_dir(TeacherConfig(model=args.model)), args.model
        else:
            source = args.config_json or args.preset
            name = args.preset or args.config_json
        result = plan(
            source,
            args.student_layers,
            args.ranks,
            args.batch,
            args.seq,
            dtype=args.dtype,
            gpu_mem=args.gpu_mem,
            host_mem=args.host_mem,
            ranks_per_node=args.ranks_per_node,
            name=name,
        )
    except known_errors() + (PlanError,) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(render_plan(result, args.quantization), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_dict(result), indent=1))
    return 0


def _one_line_errors(action: Any) -> int:
    """Run ``action()`` (which prints its own result): 0, or 2 with bad input as one line on stderr."""
    from .errors import known_errors, one_line

    try:
        action()
    except known_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _tracking_replay(args: argparse.Namespace) -> int:
    from .tracking import replay

    def action() -> None:
        run_id = replay(args.buffer, tracking_uri=args.tracking_uri, end_status=args.end_status)
        print(f"replayed into MLflow run {run_id}")

    return _one_line_errors(action)


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    def action() -> None:
        out = export_checkpoint(args.checkpoint_dir, args.out, tag=args.tag, model_config=args.model_config)
        print(f"exported: {out}")

    return _one_line_errors(action)


def _recommend(args: argparse.Namespace) -> int:
    from collections import Counter

    from .config import load_config
    from .errors import known_errors, one_line
    from .recommender import BaseRecommender

    try:
        cfg = load_config(args.preset, args.overrides)
        from .data import load_splits

        rec = BaseRecommender(
            model_name=args.model, data=load_splits(cfg.data), data_config=cfg.data, serve_config=cfg.serve
        )
        history = None if args.history is None else [i.strip() for i in args.history.split(",") if i.strip()]
        items = rec.recommend(user_id=args.user, category=args.category, top_k=args.top_k, history=history)
        _, candidates = rec.candidates(args.user, args.category, at_least=args.top_k, history=history)
        sources = Counter(c.source for c in candidates)
        d = rec.data_config
        print(f"# model: {args.model}  user: {args.user}  category: {args.category}  formulation: {d.formulation}")
        if cfg.serve.num_candidates == 0:
            print(
                f"# candidates: every untouched item ({len(candidates)}; serve.num_candidates=0), scored by the model"
            )
        else:
            print(
                f"# candidates: {len(candidates)} retrieved ({sources['co-occurrence']} by co-occurrence with the "
                f"user's last {cfg.serve.seed_items} items in the training interactions, {sources['popularity']} "
                "by popularity), re-ranked by the model in one batched pass"
            )
        print(f"# score: {rec.score_meaning}")
        print("# rank. item_id  score  source  title")
        for i, item in enumerate(items, 1):
            print(f"{i}. {item['item_id']}  {item['score']:.4f}  {item['source']}  {item['title']}")
    except known_errors() + (KeyError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
