"""Median time from a killed ssh client to the forward restored and all workers back.

    python benchmarks/recovery.py --kills 10 [--out bench-out]

wqsupervisor and autossh -M 0 (Debian's autossh, AUTOSSH_GATETIME=0) run side
by side on the same loopback head node, each with its own master and workers;
their ssh clients are killed in turn.
"""

import argparse
import json
import pathlib

from wqsupervisor.harness.bench import recovery

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kills", type=int, default=10)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--binding", default="debian", choices=("debian", "ndcctools", "server"))
parser.add_argument("--pythonpath", help="where ndcctools lives, for --binding ndcctools")
parser.add_argument("--worker", help="work_queue_worker to use (e.g. /opt/cctools/bin/work_queue_worker)")
parser.add_argument("--out", default="bench-out")
args = parser.parse_args()

result = recovery.run(
    kills=args.kills,
    n_workers=args.workers,
    binding=args.binding,
    pythonpath=args.pythonpath,
    worker_program=args.worker,
)
out = pathlib.Path(args.out)
out.mkdir(exist_ok=True)
(out / "recovery.json").write_text(json.dumps(result, indent=2))
for name, tool in result["tools"].items():
    r, w = tool["restored"], tool["workers"]
    print(
        f"{name:13s} forward restored median {r['median']:.3f} s (min {r['min']:.3f}, max {r['max']:.3f}, "
        f"n={r['n']}); all workers back median {w['median']:.2f} s (min {w['min']:.2f}, max {w['max']:.2f})"
    )
print(
    f"ratio wqsupervisor/autossh: restored {result['ratio_restored_wqs_over_autossh']:.2f}, "
    f"workers {result['ratio_workers_wqs_over_autossh']:.2f}"
)
