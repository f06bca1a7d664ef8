"""The benchmark harness: recovery and task throughput through the tunnel, side by side.

Each figure is measured against its comparator in the same run, interleaved
(A B A B), because the machines this runs on are shared and noisy.

* :mod:`.suite` is ``python -m wqsupervisor bench``; :mod:`.report` its figures and plots;
* single studies, each with a ``main()`` that a script in ``benchmarks/`` calls:
  :mod:`.taskrate`, :mod:`.recovery`, :mod:`.faults`, :mod:`.scaling`, :mod:`.soak`,
  :mod:`.backends`;
* their parts: :mod:`.master` (a master in a child process), :mod:`.tunnels` (the
  tunnels compared), :mod:`.netpaths` (the network paths) and :mod:`.traffic`
  (the processes at their ends).
"""
