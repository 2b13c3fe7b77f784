"""Adapt the teacher with LoRA adapters on every rank the launcher started.

    deepspeed --num_gpus 2 launchers/adapt.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Loads the teacher as the frozen base (NF4 partitioned by ZeRO-3 for QLoRA when
``adapt.quantized_base`` and ``teacher.quantization=nf4``; else full precision), trains
LoRA adapters (``adapt.*``) on the training prompts through a DeepSpeed engine, and
writes ``<output_dir>/adapt/adapter`` (PEFT) and ``<output_dir>/adapt/merged`` (a
full-precision Hugging Face folder to use as ``teacher.model`` in later runs).
"""

import sys

from layerwise_dist.recipes import jobs
from layerwise_dist.worker import config_from_argv, run_job


def main() -> int:
    # The recipe is layerwise_dist/recipes/jobs.py::adapt; the config comes from
    # --preset (or --config), --ds_config and key=value overrides; bad input exits 2 with one line.
    return run_job(jobs.adapt, lambda: config_from_argv("adapt", sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
