"""Time to the first task on a new worker, and jobs per task on a bursty workload:
wqsupervisor's policy against work_queue_factory -T slurm, with a real Slurm in the lab.

    python benchmarks/scaling.py --reps 2 [--out bench-out]

Needs root (the firewall lab and Slurm).
"""

import sys

from wqsupervisor.harness.bench import scaling

sys.exit(scaling.main())
