"""Per fault: time to detection, to the forward working again, to all workers back, and
worker connections lost, for wqsupervisor, autossh -M 0 (ServerAlive 15/3) and autossh -M PORT.

    python benchmarks/faults.py [--reps 3] [--only ssh-killed peer-hung ...] [--tools ...] [--out bench-out]

Needs root (it builds the firewall lab). All three run side by side in the
same lab for every fault; see wqsupervisor/bench/faults.py.
"""

import argparse
import json
import pathlib

from wqsupervisor.harness.bench import faults

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--reps", type=int, default=1)
parser.add_argument("--only", nargs="*", choices=sorted(faults.faults()))
parser.add_argument("--out", default="bench-out")
parser.add_argument(
    "--tools",
    nargs="*",
    choices=faults.tool_names(),
    help="tools side by side (default: wqsupervisor autossh-M0 autossh-monitor)",
)
args = parser.parse_args()

result = faults.run(only=args.only, reps=args.reps, tools=args.tools)
out = pathlib.Path(args.out)
out.mkdir(exist_ok=True)
(out / "faults.json").write_text(json.dumps(result, indent=2))


def cell(figures: dict) -> str:
    if figures["n"] == 0:
        return "never"
    text = f"{figures['median']:.1f} ({figures['max']:.1f})"
    return text + (f" +{figures['never']} never" if figures.get("never") else "")


print("| fault | tool | detected s, median (worst) | forward back s | workers back s | connections lost |")
print("|---|---|---|---|---|---|")
for name, fault in result["faults"].items():
    for tool, figures in fault["tools"].items():
        lost = figures["lost"]
        print(
            f"| {name} | {tool} | {cell(figures['detected_s'])} | {cell(figures['forward_s'])} | "
            f"{cell(figures['workers_s'])} | {lost['median']:g} ({lost['max']:g}) |"
        )
