"""Run a command of the package as a Ray Train job (TorchTrainer, one worker per rank).

    python launchers/ray_distill.py --num_workers 2 [--address auto] [--preset tiny] [--command pipeline] [key=value ...]

Without ``--address`` it starts a local Ray instance (CPU: gloo, one core per
worker); with ``--address auto`` it joins the cluster started by
``slurm/ray_cluster.sbatch``. The student's HF folder becomes the Ray checkpoint
(under ``--storage_path``); results.json and report.md stay in ``output_dir``.
"""

import argparse
import sys
from pathlib import Path

from layerwise_dist.config import ConfigError
from layerwise_dist.ray_train import init_ray, run_ray
from layerwise_dist.recipes.jobs import JOBS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", default="pipeline", choices=list(JOBS))
    parser.add_argument("--preset", default="default", help="preset name (default, tiny) or a YAML file")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (sets ds_config=...)")
    parser.add_argument("--num_workers", type=int, default=2, help="Ray Train workers = ranks")
    parser.add_argument("--use_gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus_per_worker", type=int, default=1)
    parser.add_argument("--address", default=None, help="existing Ray cluster (auto, or head:6379); default: local")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--storage_path", default="results/ray", help="where Ray keeps runs and checkpoints")
    parser.add_argument("--name", default=None, help="Ray run name (default: <command>-<output_dir name>-<time>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")
    args = parser.parse_args()

    overrides = list(args.overrides) + ([f"ds_config={args.ds_config}"] if args.ds_config else [])
    init_ray(args.address, args.num_cpus)
    import ray.train

    try:
        result = run_ray(
            args.command,
            args.preset,
            overrides,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            storage_path=args.storage_path,
            name=args.name,
            cpus_per_worker=args.cpus_per_worker,
        )
    except ConfigError as e:
        print(f"error: ConfigError: {e}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as e:
        print(f"error: Ray Train run failed: {e}", file=sys.stderr)
        return 1

    metrics = result.metrics or {}
    print("\nmetrics (rank 0):")
    for key, value in sorted(metrics.items()):
        print(f"  {key} = {value}")
    output_dir = Path(metrics.get("output_dir", "."))
    print(f"\nRay run:    {result.path}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '(none: no student in this command)'}")
    print(f"results:    {output_dir / 'results.json'}")
    if (output_dir / "report.md").exists():
        print(f"report:     {output_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
