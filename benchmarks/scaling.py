"""Time to the first task on a new worker, and jobs per task on a bursty workload:
wqsupervisor's policy against work_queue_factory -T slurm, with a real Slurm in the lab.

    python benchmarks/scaling.py --reps 2 [--out bench-out]

Needs root (the firewall lab and Slurm).
"""

import argparse
import json
import pathlib

from wqsupervisor.harness.bench import scaling

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--reps", type=int, default=2)
parser.add_argument("--bursts", type=int, default=3)
parser.add_argument("--burst-size", type=int, default=20)
parser.add_argument("--gap", type=float, default=30.0)
parser.add_argument("--out", default="bench-out")
args = parser.parse_args()

result = scaling.run(reps=args.reps, bursts=args.bursts, burst_size=args.burst_size, gap=args.gap)
out = pathlib.Path(args.out)
out.mkdir(exist_ok=True)
(out / "scaling.json").write_text(json.dumps(result, indent=2))
for tool, figures in result["tools"].items():
    first, jobs = figures["first_task_s"], figures["jobs_per_task"]
    print(
        f"{tool:19s} first task {first['median']:.1f} s (min {first['min']:.1f}, max {first['max']:.1f}); "
        f"jobs per task {jobs['median']:.3f} (min {jobs['min']:.3f}, max {jobs['max']:.3f}), n={jobs['n']}"
    )
if "ratio_first_task_wqs_over_factory" in result:
    print(
        f"wqsupervisor / work_queue_factory: first task {result['ratio_first_task_wqs_over_factory']:.2f}, "
        f"jobs per task {result['ratio_jobs_per_task_wqs_over_factory']:.2f}"
    )
