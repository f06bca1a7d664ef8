"""Work Queue master beside TaskVine manager: supervised/direct task rate and recovery after an ssh kill.

    python benchmarks/kinds.py --rounds 5 --pythonpath /opt/cctools/lib/python3.11/site-packages \
        --cctools-bin /opt/cctools/bin

Needs a cctools build (ndcctools' Work Queue and TaskVine, and their workers).
"""

import sys

from wqsupervisor.harness.bench import kinds

sys.exit(kinds.main())
