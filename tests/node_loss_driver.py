"""A `cape-ray train` driver for the node-loss tests: `job.run` (checks, lease, attach to
RAY_ADDRESS, the console relay, fit) with tests/node_faults.py's logging train function.

    python tests/node_loss_driver.py LOG_DIR STEP_DELAY_S TRAIN_FLAGS...
"""

from __future__ import annotations

import os
import sys

from ray import cloudpickle

import node_faults
from cape_ray import job
from cape_ray.cli import build_parser, config_from_args


def main() -> int:
    log_dir, delay, flags = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    parser = build_parser()
    config = config_from_args(parser.parse_args(["train", *flags]), parser)
    cloudpickle.register_pickle_by_value(node_faults)  # the workers need not import tests/
    plan = {"log_dir": log_dir, "step_delay_s": delay}
    assert os.environ["RAY_ADDRESS"]  # attach to the test's cluster
    result = job.run(config, train_fn=node_faults.train_logged, train_loop_config={**config.to_dict(), "_node_plan": plan})
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
