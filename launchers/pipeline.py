"""The whole job: Fisher profile, distillation, evaluation of teacher and student, report.

    deepspeed --num_gpus 2 launchers/pipeline.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Same as ``layerwise-dist pipeline --nproc 2``.
"""

import sys

from layerwise_dist.recipes import jobs
from layerwise_dist.worker import config_from_argv, run_job


def main() -> int:
    # The recipe is layerwise_dist/recipes/jobs.py::pipeline; the config comes from
    # --preset (or --config), --ds_config and key=value overrides; bad input exits 2 with one line.
    return run_job(jobs.pipeline, lambda: config_from_argv("pipeline", sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
