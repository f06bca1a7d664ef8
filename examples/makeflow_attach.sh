#!/bin/sh
# Makeflow's Work Queue master behind a firewall: makeflow on a port of its choosing, and a
# supervisor attached to that port, which ends by itself once makeflow has stopped listening
# for 10 s. Usage: sh makeflow_attach.sh [WORKFLOW] (default: workflow.mf), with
#   VIA          the head node ([user@]host; default alice@login.cluster.edu)
#   REMOTE_PORT  the port the workers use on the head node (default 10001)
#   WORKERS      how workers are started (default slurm; ssh: on the head node itself)
#   PASSWORD     the password file of master and workers (default wq.pw, made if missing)
# Other settings come from WQSUPERVISOR_* variables or a config file (see the README).
set -eu
# Debian's makeflow is linked with Open MPI: without openmpi-bin it needs this variable.
export OMPI_MCA_ess_singleton_isolated=1
password=${PASSWORD:-wq.pw}
[ -f "$password" ] || (umask 077 && head -c 24 /dev/urandom | base64 >"$password")
ports=$(mktemp -d)
trap 'rm -rf "$ports"' EXIT
makeflow -T wq -Z "$ports/port" --password "$password" "${1:-workflow.mf}" &
flow=$!
# attach needs the master listening: makeflow writes its port file once it is.
i=0
until [ -s "$ports/port" ]; do
    kill -0 "$flow" 2>/dev/null || { wait "$flow"; exit $?; }
    i=$((i + 1)); [ $i -lt 300 ] || { echo "makeflow did not start listening" >&2; kill "$flow"; exit 1; }
    sleep 0.1
done
python3 -m wqsupervisor attach --master-port "$(cat "$ports/port")" --password-file "$password" \
    --via "${VIA:-alice@login.cluster.edu}" --remote-port "${REMOTE_PORT:-10001}" \
    --workers "${WORKERS:-slurm}" --until-master-exits &
attach=$!
flow_status=0
wait "$flow" || flow_status=$?
attach_status=0
wait "$attach" || attach_status=$?
[ "$flow_status" -ne 0 ] && exit "$flow_status"
exit "$attach_status"
