"""The whole job: Fisher profile, distillation, evaluation of teacher and student, report.

    deepspeed --num_gpus 2 launchers/pipeline.py --ds_config ds_configs/zero3.json [--preset default] [key=value ...]

Same as ``layerwise-dist pipeline --nproc 2``.
"""

import sys

from layerwise_dist.worker import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
