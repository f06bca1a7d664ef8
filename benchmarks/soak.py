"""Soak the supervised tunnel: tasks flow while a random lab fault hits every K seconds.

    python benchmarks/soak.py --minutes 20 --every 25 [--seed 1] [--out bench-out]

Needs root. Prints tasks, faults, recoveries, the worst recovery and the
losses (which must be zero); tests/test_soak.py runs a 2-minute version.
"""

import sys

from wqsupervisor.harness.bench import soak

sys.exit(soak.main())
