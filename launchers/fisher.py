"""Measure the layerwise Fisher profile of the teacher across all ranks.

    deepspeed --num_gpus 2 launchers/fisher.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Each rank scores its own share of the training prompts; one all-reduce gives the
profile, written to ``<output_dir>/fisher_profile.json`` and ``.png``.
"""

import sys

from layerwise_dist.worker import main

if __name__ == "__main__":
    sys.exit(main(["fisher", *sys.argv[1:]]))
