"""The harness around wqsupervisor: what its demo, tests and benchmarks stand on.

Nothing in the core imports this package (``cli.py`` loads it only to run the
``demo`` and ``bench`` commands), and nothing here imports in a cycle. It holds:

* :mod:`.sandbox` -- a throwaway loopback head node (a private sshd) and local workers;
* :mod:`.demo` -- the demo that ``python -m wqsupervisor demo`` runs;
* :mod:`.lab` -- the firewall lab: network namespaces and their faults;
  :mod:`.slurm` -- a real Slurm in it; :mod:`.labapps` -- what runs on its hosts;
* :mod:`.bench` -- the benchmarks behind ``python -m wqsupervisor bench`` and ``benchmarks/``;
* :mod:`.common` -- what those share.

Importing this package loads none of them.
"""
