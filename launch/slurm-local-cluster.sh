#!/usr/bin/env bash
# A two-node Slurm cluster on this machine, for tests and for trying launch/slurm.sbatch:
#   bash launch/slurm-local-cluster.sh up   STATE   # munge + slurmctld + slurmd n1, n2
#   bash launch/slurm-local-cluster.sh exec STATE CMD...   # run CMD on the submit host (sbatch, srun, ...)
#   bash launch/slurm-local-cluster.sh down STATE   # kill everything, delete namespaces and STATE
# Every daemon lives in its own network namespace (ctl 10.98.0.1, n1 .2, n2 .3, joined by a bridge in a
# switch namespace; no address outside them) and its own mount + UTS namespace with its own hostname,
# /etc/hosts, ssh client config and /tmp (as real nodes have; PMIx keeps per-node files in /tmp). n1 and
# n2 run an sshd (keys made per cluster in STATE) so launchers inside an allocation can ssh between
# nodes. STATE must be on a filesystem every node sees, not under /tmp. One munged (a Unix socket in
# STATE) serves all nodes. Needs root, iproute2, util-linux, openssh-server and Debian's slurmctld
# slurmd slurm-client munge (`bash launch/install.sh --test-tools`).
set -euo pipefail

usage() { echo "usage: $0 up|down STATE | exec STATE CMD..." >&2; exit 2; }
[ $# -ge 2 ] || usage
ACTION="$1"
STATE="$(realpath -m "$2")"
shift 2
TAG="${HVDLLM_SLURM_TAG:-hvslurm}"
NET=10.98.0
NODES=(ctl n1 n2)
# A checkout under /tmp (CI clones may live there) stays visible on the nodes despite their own /tmp.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$ROOT" in /tmp/*) KEEP="$ROOT" ;; *) KEEP="" ;; esac

ns() { echo "$TAG-$1"; }

# in_node NODE CMD...: CMD in NODE's network namespace with its own hostname, /etc/hosts, ssh config, /tmp
# (with KEEP, the checkout, bound back into it).
in_node() {
  local node="$1"
  shift
  # shellcheck disable=SC2016  # expanded by the inner sh
  nsenter --net="/run/netns/$(ns "$node")" unshare --uts --mount --propagation private \
    sh -c 'hostname "$1" && { [ -z "$3" ] || { mkdir -p "$2/tmp/$1/${3#/tmp/}" && mount --bind "$3" "$2/tmp/$1/${3#/tmp/}"; }; } && mount --rbind "$2/tmp/$1" /tmp && mount --bind "$2/hosts" /etc/hosts && mount --bind "$2/ssh/ssh_config" /etc/ssh/ssh_config && shift 3 && exec "$@"' \
    sh "$node" "$STATE" "$KEEP" "$@"
}

write_conf() {
  local n
  mkdir -p "$STATE"/{munge,state,spool,log,run,ssh} "$STATE"/tmp/{ctl,n1,n2}
  chmod 700 "$STATE/munge" "$STATE/ssh"
  ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh/id_ed25519"
  ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh/host_key"
  cp "$STATE/ssh/id_ed25519.pub" "$STATE/ssh/authorized_keys"
  printf '%s\n' "Host *" "  IdentityFile $STATE/ssh/id_ed25519" "  IdentitiesOnly yes" "  StrictHostKeyChecking no" \
    "  UserKnownHostsFile /dev/null" "  LogLevel ERROR" "  BatchMode yes" "  ConnectTimeout 10" >"$STATE/ssh/ssh_config"
  for n in n1 n2; do
    printf '%s\n' "ListenAddress $NET.$((${n#n} + 1))" "HostKey $STATE/ssh/host_key" "PidFile $STATE/run/sshd-$n.pid" \
      "AuthorizedKeysFile $STATE/ssh/authorized_keys" "PermitRootLogin prohibit-password" "PasswordAuthentication no" \
      "KbdInteractiveAuthentication no" "UsePAM no" "StrictModes no" "MaxStartups 100" "LogLevel ERROR" \
      >"$STATE/ssh/sshd-$n.conf"
  done
  {
    echo "127.0.0.1 localhost"
    for n in 0 1 2; do echo "$NET.$((n + 1)) ${NODES[$n]}"; done
  } >"$STATE/hosts"
  cat >"$STATE/slurm.conf" <<EOF
ClusterName=hvdllm
SlurmctldHost=ctl($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.sock,cred_expire=5
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=3
MinJobAge=600
NodeName=n1 NodeAddr=$NET.2 CPUs=1 State=UNKNOWN
NodeName=n2 NodeAddr=$NET.3 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  case "$STATE" in /tmp|/tmp/*) echo "STATE must not be under /tmp (every node has its own /tmp)" >&2; exit 2 ;; esac
  local tool i n
  mkdir -p /run/sshd                     # sshd's privilege-separation directory
  for tool in ip nsenter unshare munged slurmctld slurmd sbatch sshd ssh-keygen; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 \
      || { echo "$tool is missing: run \`bash launch/install.sh --test-tools\`" >&2; exit 1; }
  done
  export PATH="$PATH:/usr/sbin"
  write_conf
  ip netns add "$(ns sw)"
  ip -n "$(ns sw)" link add br0 type bridge
  ip -n "$(ns sw)" link set br0 up
  for i in 0 1 2; do
    n="${NODES[$i]}"
    ip netns add "$(ns "$n")"
    ip -n "$(ns sw)" link add "p$i" type veth peer name eth1 netns "$(ns "$n")"
    ip -n "$(ns sw)" link set "p$i" master br0 up
    ip -n "$(ns "$n")" addr add "$NET.$((i + 1))/24" dev eth1
    ip -n "$(ns "$n")" link set eth1 up
    ip -n "$(ns "$n")" link set lo up
  done
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE/munge/munge.key"
  munged --force --socket="$STATE/munge/munge.sock" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
  export SLURM_CONF="$STATE/slurm.conf"
  in_node ctl slurmctld -i -f "$SLURM_CONF" </dev/null >>"$STATE/log/slurmctld.out" 2>&1
  for n in n1 n2; do
    in_node "$n" slurmd -N "$n" -f "$SLURM_CONF" </dev/null >>"$STATE/log/slurmd-$n.out" 2>&1
    in_node "$n" /usr/sbin/sshd -f "$STATE/ssh/sshd-$n.conf" -E "$STATE/log/sshd-$n.log"
  done
  for _ in $(seq 60); do
    if [ "$(in_node ctl sinfo -h -t idle -o '%D' 2>/dev/null)" = 2 ]; then
      echo "slurm cluster up: SLURM_CONF=$SLURM_CONF, nodes n1 n2 idle"
      return 0
    fi
    sleep 0.5
  done
  echo "the cluster did not come up; logs in $STATE/log:" >&2
  tail -n 20 "$STATE"/log/* >&2 || true
  down
  exit 1
}

down() {
  local n pid
  for n in n2 n1 ctl sw; do
    [ -e "/run/netns/$(ns "$n")" ] || continue
    for _ in $(seq 20); do
      pids="$(ip netns pids "$(ns "$n")")"
      [ -n "$pids" ] || break
      for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
      sleep 0.1
    done
    ip netns del "$(ns "$n")" || true
  done
  if [ -f "$STATE/munge/munged.pid" ]; then
    kill "$(cat "$STATE/munge/munged.pid")" 2>/dev/null || true
  fi
  rm -rf "$STATE"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  exec) [ $# -ge 1 ] || usage; SLURM_CONF="$STATE/slurm.conf" in_node ctl "$@" ;;
  *) usage ;;
esac
