"""Daily update job for `ray job submit --working-dir . -- python jobs/daily_update.py --config ...
--day-events PATH --day-impressions PATH`: encode the new day's atoms, rebuild the samples,
warm-start training from the last best checkpoint. Same flags as `bahe daily-update`."""

import sys

from bahe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["daily-update", *sys.argv[1:]]))
