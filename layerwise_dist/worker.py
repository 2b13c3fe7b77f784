"""What each rank runs: parse the command line, load the config, run the stages.

Started by the launchers (``deepspeed launchers/distill.py ...``), by
``layerwise-dist <command>`` (through the ``deepspeed`` launcher when
``--nproc`` > 1) or by a Ray Train worker.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .config import help_text, load_config

COMMANDS = {
    "fisher": ("fisher",),
    "distill": ("distill", "evaluate"),
    "evaluate": ("evaluate",),
    "pipeline": ("fisher", "distill", "evaluate"),
}

DESCRIPTIONS = {
    "fisher": "measure the layerwise Fisher profile of the teacher (JSON + PNG in output_dir)",
    "distill": "build the student from teacher layers, distil it, save it and score it on the test split",
    "evaluate": "score teacher and student (output_dir/student) on the test split: HR@K, NDCG@K, MRR, latency, memory",
    "pipeline": "the whole job: Fisher profile, distillation, evaluation of teacher and student, report, MLflow run",
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help="preset name (default, tiny) or a YAML file")
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


def resolve(command: str, args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.ds_config:
        overrides.append(f"ds_config={args.ds_config}")
    return load_config(args.preset, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before our arguments.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: worker {{{','.join(COMMANDS)}}} [--preset P] [key=value ...]", file=sys.stderr)
        return 2
    command = argv[0]
    args = build_parser(command).parse_args(argv[1:])
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per collective:
    # thousands of identical lines that bury the progress bars. Not ours to fix; keep the rest.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from .errors import KNOWN_ERRORS, one_line

    try:
        cfg = resolve(command, args)
        from .pipeline import run

        run(cfg, COMMANDS[command], evaluate_teacher=command != "distill")
    except KNOWN_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
