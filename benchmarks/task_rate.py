"""Work Queue empty-task rate direct vs through wqsupervisor vs through the HOWTO's ssh -N -R.

    python benchmarks/task_rate.py --rounds 7 --tasks 200 [--out bench-out]

Paths are interleaved in every round and each rate is divided by the direct
rate of the same round; steady rates (first to last completion) are the
figures to compare, whole-run rates are shown beside them.
"""

import sys

from wqsupervisor.harness.bench import taskrate

sys.exit(taskrate.main())
