"""Soak the supervised tunnel: tasks flow while a random lab fault hits every K seconds.

    python benchmarks/soak.py --minutes 20 --every 25 [--seed 1] [--out bench-out]

Needs root. Prints tasks, faults, recoveries, the worst recovery and the
losses (which must be zero); tests/test_soak.py runs a 2-minute version.
"""

import argparse
import json
import pathlib

from wqsupervisor.harness.bench import soak

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--minutes", type=float, default=20.0)
parser.add_argument("--every", type=float, default=25.0)
parser.add_argument("--seed", type=int, default=None)
parser.add_argument("--out", default="bench-out")
args = parser.parse_args()

result = soak.run(minutes=args.minutes, every=args.every, seed=args.seed)
out = pathlib.Path(args.out)
out.mkdir(exist_ok=True)
(out / "soak.json").write_text(json.dumps(result, indent=2))
fb = result["forward_back"]
print(
    f"tasks {result['tasks']}, faults {result['faults']} {result['by_kind']}, tunnel restarts "
    f"{result['tunnel_restarts']}; forward back median {fb['median']:.2f} s, worst "
    f"{result['worst_forward_back_s']:.2f} s; lost {result['lost']}, duplicated {result['duplicated']}, "
    f"wrong output {result['wrong_output']}"
)
