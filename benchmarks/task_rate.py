"""Work Queue empty-task rate direct vs through wqsupervisor vs through the HOWTO's ssh -N -R.

    python benchmarks/task_rate.py --rounds 7 --tasks 200 [--out bench-out]

Paths are interleaved in every round and each rate is divided by the direct
rate of the same round; steady rates (first to last completion) are the
figures to compare, whole-run rates are shown beside them.
"""

import argparse
import json
import pathlib

from wqsupervisor.harness.bench import taskrate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--tasks", type=int, default=200)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--command", default="true")
parser.add_argument("--binding", default="debian", choices=("debian", "ndcctools", "server"))
parser.add_argument("--pythonpath", help="where ndcctools lives, for --binding ndcctools")
parser.add_argument("--worker", help="work_queue_worker to use (e.g. /opt/cctools/bin/work_queue_worker)")
parser.add_argument(
    "--session",
    action="store_true",
    help="also measure a plain 'ssh -T -R ... cat' session tunnel, without supervision",
)
parser.add_argument("--out", default="bench-out")
args = parser.parse_args()

paths = (*taskrate.PATHS, taskrate.SESSION) if args.session else taskrate.PATHS
result = taskrate.run(
    rounds=args.rounds,
    tasks=args.tasks,
    n_workers=args.workers,
    command=args.command,
    paths=paths,
    binding=args.binding,
    pythonpath=args.pythonpath,
    worker_program=args.worker,
)
out = pathlib.Path(args.out)
out.mkdir(exist_ok=True)
(out / "task_rate.json").write_text(json.dumps(result, indent=2))
for name, path in result["paths"].items():
    s = path["steady"]
    line = f"{name:13s} steady {s['median']:7.1f} tasks/s (min {s['min']:.1f}, max {s['max']:.1f})"
    if "steady_ratio_to_direct" in path:
        r = path["steady_ratio_to_direct"]
        line += f"  / direct {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}, n={r['n']})"
    print(line)
if "steady_ratio_wqs_over_plain" in result:
    print(f"wqsupervisor / ssh -N -R steady: {result['steady_ratio_wqs_over_plain']:.1f}x")
