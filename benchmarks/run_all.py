"""Every benchmark of the package in one run, written where the project keeps its published results.

    python3 benchmarks/run_all.py            # full run: benchmarks/results/*, benchmarks/RESULTS.md
    python3 benchmarks/run_all.py --quick --out bench-out

The same as ``python -m wqsupervisor bench``; without ``--out`` it writes the
figures and plots to benchmarks/results/ and the page benchmarks/RESULTS.md.
"""

import pathlib
import shlex
import sys

from wqsupervisor.harness.bench import suite

here = pathlib.Path(__file__).resolve().parent
args = sys.argv[1:]
command = " ".join(["python3 benchmarks/run_all.py", *map(shlex.quote, args)])
if "--out" not in args:
    args += ["--out", str(here / "results"), "--publish", str(here / "RESULTS.md")]
sys.exit(suite.main(args, command=command))
