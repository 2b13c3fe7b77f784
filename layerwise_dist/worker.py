"""What each rank runs: the resolved config in, one job of :mod:`layerwise_dist.recipes.jobs` out.

Started by the launchers (``deepspeed launchers/distill.py ...``), by
``layerwise-dist <command>`` (through the ``deepspeed`` launcher when
``--nproc`` > 1, which hands every rank the config it already resolved as
``--config <output_dir>/config.yaml``) or, in the same way, by a Ray Train worker.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

from .commands import DESCRIPTIONS, job
from .config import RunConfig, help_text, load_config


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help="preset name (default, tiny) or a YAML file")
    parser.add_argument(
        "--config", default=None, help="a resolved config YAML (written by a run) used as is, instead of --preset"
    )
    parser.add_argument("--ds_config", "--ds-config", default=None, help="DeepSpeed JSON (sets ds_config=...)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"layerwise-dist {command}",
        description=DESCRIPTIONS[command],
        epilog="config keys (key=value):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    return parser


def resolve(args: argparse.Namespace) -> RunConfig:
    """The run config from the command line: a preset (or a resolved YAML) plus overrides."""
    overrides = list(args.overrides)
    if args.ds_config:
        overrides.append(f"ds_config={args.ds_config}")
    return load_config(args.config or args.preset, overrides)


def config_from_argv(command: str, argv: list[str]) -> RunConfig:
    """Parse a launcher's command line (``--preset``/``--config``, ``--ds_config``, ``key=value``)."""
    # The deepspeed launcher puts --local_rank=N before our arguments.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    return resolve(build_parser(command).parse_args(argv))


def run_job(job: Callable[[RunConfig], dict[str, Any]], cfg: RunConfig | Callable[[], RunConfig]) -> int:
    """Run ``job`` on this rank: exit code 0, 2 with one line on stderr for bad input, 128 + signum
    with one line when SIGTERM/SIGINT stopped it (at a step boundary, checkpointed, in the training loop)."""
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per collective:
    # thousands of identical lines that bury the progress bars. Not ours to fix; keep the rest.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from .distributed import quiet_third_party
    from .errors import KNOWN_ERRORS, one_line
    from .trainer import StoppedBySignal, stop_signals

    quiet_third_party()

    try:
        with stop_signals():
            cfg = cfg() if callable(cfg) else cfg
            results = job(cfg)
    except StoppedBySignal as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KNOWN_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    _print_summary(cfg, results)
    return 0


def _print_summary(cfg: RunConfig, results: dict[str, Any]) -> None:
    """Rank 0 prints the results table and where the report and the MLflow run are."""
    from pathlib import Path

    from .distributed import is_main

    if not is_main():
        return
    out = Path(cfg.output_dir)
    if "teacher" in results or "student" in results:
        from .report import quality_table, results_table

        quality = quality_table(results)
        if quality:
            print("\nranking quality, same users (95% bootstrap intervals):\n" + quality)
        print("\n" + results_table(results))
        print(f"\nreport: {out / 'report.md'}\nchart:  {out / 'report.png'}")
    if cfg.tracking.enabled:
        from .tracking import mlflow_ui_command

        run_id = results.get("mlflow_run_id")
        print(f"MLflow run: {run_id}  (open the UI: {mlflow_ui_command(out.parent)})", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] not in DESCRIPTIONS:
        print(
            f"usage: worker {{{','.join(DESCRIPTIONS)}}} [--preset P | --config FILE] [key=value ...]", file=sys.stderr
        )
        return 2
    command = argv[0]
    return run_job(job(command), lambda: config_from_argv(command, argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
