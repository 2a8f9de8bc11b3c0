"""A `cape-ray train` driver for the node-loss tests: the same as `job.run` (lease, attach to
RAY_ADDRESS, fit), with tests/node_faults.py's logging train function.

    python tests/node_loss_driver.py LOG_DIR STEP_DELAY_S TRAIN_FLAGS...
"""

from __future__ import annotations

import os
import sys

import ray
from ray import cloudpickle

import node_faults
from cape_ray import job
from cape_ray.cli import build_parser, config_from_args
from cape_ray.lease import DriverLease


def main() -> int:
    log_dir, delay, flags = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    parser = build_parser()
    config = config_from_args(parser.parse_args(["train", *flags]), parser)
    cloudpickle.register_pickle_by_value(node_faults)  # the workers need not import tests/
    plan = {"log_dir": log_dir, "step_delay_s": delay}
    with DriverLease(job.storage_uri(config), config.name):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        result = job.build_trainer(config, node_faults.train_logged, {**config.to_dict(), "_node_plan": plan}).fit()
    print(job.summary(result), flush=True)
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
