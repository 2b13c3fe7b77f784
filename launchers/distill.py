"""Distil a student from the teacher on every rank the launcher started.

    deepspeed --num_gpus 2 launchers/distill.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Runs the Fisher pass when the student selection or layer weighting needs it
(or reads ``fisher.profile=...``), builds the student from the chosen teacher
layers, trains it under a ZeRO-3 engine against the 4-bit ZeRO-3 teacher, saves
it as a Hugging Face folder (``<output_dir>/student``) and scores it on the test split.
"""

import sys

from layerwise_dist.recipes import jobs
from layerwise_dist.worker import config_from_argv, run_job


def main() -> int:
    # The recipe is layerwise_dist/recipes/jobs.py::distill; the config comes from
    # --preset (or --config), --ds_config and key=value overrides; bad input exits 2 with one line.
    return run_job(jobs.distill, lambda: config_from_argv("distill", sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
