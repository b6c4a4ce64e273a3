"""Training job for `ray job submit --working-dir . -- python jobs/train_ctr.py --config ...`.

Thin on purpose: parses the same flags as `bahe train` (builds the sample table if missing,
then trains train.model_kind with Ray Train) on the cluster the job was submitted to.
"""

import sys

from bahe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
