"""The benchmark harness: recovery and task throughput through the tunnel, side by side.

Each figure is measured against its comparator in the same run, interleaved
(A B A B), because the machines this runs on are shared and noisy. The
scripts in ``benchmarks/`` call these modules.
"""
