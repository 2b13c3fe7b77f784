"""Measure the layerwise Fisher profile of the teacher across all ranks.

    deepspeed --num_gpus 2 launchers/fisher.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Each rank scores its own share of the training prompts; one all-reduce gives the
profile, written to ``<output_dir>/fisher_profile.json`` and ``.png``.
"""

import sys

from layerwise_dist.recipes import jobs
from layerwise_dist.worker import config_from_argv, run_job


def main() -> int:
    # The recipe is layerwise_dist/recipes/jobs.py::fisher; the config comes from
    # --preset (or --config), --ds_config and key=value overrides; bad input exits 2 with one line.
    return run_job(jobs.fisher, lambda: config_from_argv("fisher", sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
