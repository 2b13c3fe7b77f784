"""Run a command of the package as a Ray Train job (TorchTrainer, one worker per rank).

    python launchers/ray_distill.py --num_workers 2 [--address auto] [--preset tiny] [--command pipeline] [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launchers/ray_distill.py --preset tiny ...

Everything Ray is told comes from the ``ray.*`` section of the config (``layerwise-dist
--help`` lists it): ``ray.num_workers``, ``ray.use_gpu``, ``ray.cpus_per_worker``
(ScalingConfig), ``ray.storage_path`` (a local folder or a URI such as ``s3://bucket/prefix``)
and ``ray.name`` (RunConfig), ``ray.max_failures`` (FailureConfig), ``ray.num_to_keep``
(CheckpointConfig; Ray checkpoints are written every ``train.save_every`` steps). The flags
below are shortcuts for those keys.

Which Ray: ``--address`` / ``ray.address`` when given (``auto`` inside ``slurm/ray_cluster.sbatch``);
else ``RAY_ADDRESS`` (``ray job submit`` sets it, so a submitted job joins its cluster); else a
new local instance (CPU: gloo, one core per worker). The student's HF folder becomes the final
Ray checkpoint; results.json, report.md and ray_reports.jsonl (every report) stay in output_dir.
"""

import argparse
import sys
from pathlib import Path

from layerwise_dist.config import ConfigError
from layerwise_dist.ray_train import REPORT_LOG, init_ray, prepare_loop_config, run_ray
from layerwise_dist.recipes.jobs import JOBS

#: --flag -> the config key it sets (the schema holds the defaults and the checks).
SHORTCUTS = {
    "num_workers": "ray.num_workers",
    "cpus_per_worker": "ray.cpus_per_worker",
    "address": "ray.address",
    "storage_path": "ray.storage_path",
    "name": "ray.name",
    "max_failures": "ray.max_failures",
    "ds_config": "ds_config",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", default="pipeline", choices=list(JOBS))
    parser.add_argument("--preset", default="default", help="preset name (default, tiny) or a YAML file")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (sets ds_config=...)")
    parser.add_argument("--num_workers", type=int, default=None, help="Ray Train workers = ranks (ray.num_workers)")
    parser.add_argument("--use_gpu", action="store_true", help="one GPU per worker, NCCL (ray.use_gpu=true)")
    parser.add_argument("--cpus_per_worker", type=int, default=None, help="ray.cpus_per_worker")
    parser.add_argument("--address", default=None, help="Ray cluster to join: auto or head:6379 (ray.address)")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of a new local Ray instance (default: all)")
    parser.add_argument(
        "--storage_path", default=None, help="Ray runs and checkpoints: folder or URI (ray.storage_path)"
    )
    parser.add_argument("--name", default=None, help="Ray run name (ray.name)")
    parser.add_argument("--max_failures", type=int, default=None, help="restarts after a failure (ray.max_failures)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")
    args = parser.parse_args()

    shortcuts = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    overrides = shortcuts + (["ray.use_gpu=true"] if args.use_gpu else []) + list(args.overrides)
    import ray
    import ray.train

    try:
        cfg = prepare_loop_config(args.command, args.preset, overrides)["config"]  # errors before Ray starts
        init_ray(cfg.ray.address, args.num_cpus)
        print(f"Ray cluster: {ray.get_runtime_context().gcs_address}", flush=True)
        result = run_ray(args.command, args.preset, overrides)
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
    output_dir = Path(cfg.output_dir)
    print(f"\nRay run:    {result.path}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '(none: no student in this command)'}")
    print(f"results:    {output_dir / 'results.json'}")
    print(f"reports:    {output_dir / REPORT_LOG}")
    if (output_dir / "report.md").exists():
        print(f"report:     {output_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
