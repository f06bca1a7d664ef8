"""Task rates with 2, 8, 32 and 64 workers, direct against one supervised tunnel; the agent's and ssh's cost.

    python benchmarks/worker_count.py --rounds 3 [--counts 2 8 32 64] [--out bench-out]

Direct and supervised alternate in every round; each supervised rate is
divided by the direct rate of the same round. The supervisor is
``python -m wqsupervisor attach`` in its own process.
"""

import sys

from wqsupervisor.harness.bench import workercount

sys.exit(workercount.main())
