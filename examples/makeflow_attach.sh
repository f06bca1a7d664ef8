#!/bin/sh
# Makeflow's Work Queue master behind a firewall: start makeflow on a fixed port, then attach
# a supervisor to that port. attach ends by itself once makeflow has stopped listening for 10 s.
# Debian's makeflow is linked with Open MPI: without openmpi-bin it needs the variable below.
set -eu
export OMPI_MCA_ess_singleton_isolated=1
makeflow -T wq -p 9123 --password wq.pw "${1:-workflow.mf}" &
python3 -m wqsupervisor attach --master-port 9123 --password-file wq.pw \
    --via alice@login.cluster.edu --remote-port 10001 --workers slurm --until-master-exits &
wait
