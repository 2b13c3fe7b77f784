"""DeepSpeed's per-node launcher, run in a process that does not import MLflow.

    python -m layerwise_dist.ds_launch <the arguments of deepspeed.launcher.launch>

Runs ``deepspeed.launcher.launch`` unchanged (same arguments, signals, exit code), with ``import mlflow``
failing in this one process: importing DeepSpeed imports its autotuner, which imports MLflow whenever it is
installed, and the launcher never tracks anything. That import is about 2.5 s of the launcher's 6 s start on
two CPU cores (3.2-4.3 s against 5.7-7.2 s, ``python -c "import deepspeed.launcher.launch"`` with and without
it), paid before any rank starts. The ranks the launcher starts are processes of their own and import MLflow as
usual (rank 0 tracks the run).
"""

from __future__ import annotations

import runpy
import sys

LAUNCHER = "deepspeed.launcher.launch"


def main() -> None:
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError here only
    runpy.run_module(LAUNCHER, run_name="__main__", alter_sys=True)  # alter_sys: argv[0] is the launcher's file


if __name__ == "__main__":
    main()
