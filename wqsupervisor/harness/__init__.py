"""The harness around wqsupervisor: what its demo, tests and benchmarks stand on.

Nothing in the core imports this package (``cli.py`` loads it only to run the
``demo`` and ``bench`` commands). It holds:

* :mod:`.sandbox` -- a throwaway loopback head node (a private sshd) and local workers;
* :mod:`.demo` -- the demo that ``python -m wqsupervisor demo`` runs;
* :mod:`.lab` -- the firewall lab: network namespaces, their faults, and a real Slurm;
* :mod:`.bench` -- the benchmarks behind ``python -m wqsupervisor bench``.

Importing this package loads none of them.
"""
