# Shell functions shared by scripts/vm and scripts/vm-lab (sourced, never run): the accelerator
# qemu gets, a process stopped for good, and the job a VM of scripts/vm's image runs (its unit
# throttle-vm-job.service mounts the disk labelled throttle-job and runs `run` from it; the job
# writes to the second serial port and ends with VM_MARKER and its exit code). The caller defines
# say() and sources scripts/lib/debian.sh first (PATH_IN_ROOT).
VM_MARKER="[vm] the command's exit code:"  # a job's last line, read on this machine

# stop_pid PID: TERM, then KILL after 5 s; waits, so that nothing is left behind.
stop_pid() {
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# vm_accel [kvm|tcg]: sets VM_ACCEL (kvm when /dev/kvm opens and the CPU shows vmx or svm, else
# tcg, unless one is given) and VM_ACCEL_ARGS, qemu's options for it.
vm_accel() {
  VM_ACCEL=${1:-}
  if [ -z "$VM_ACCEL" ]; then
    VM_ACCEL=tcg
    if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then VM_ACCEL=kvm; fi
  fi
  if [ "$VM_ACCEL" = kvm ]; then
    VM_ACCEL_ARGS=(-accel kvm -cpu host)
  else
    VM_ACCEL_ARGS=(-accel tcg,thread=multi -cpu max)
  fi
}

# job_head COMMIT CA_DIR [VAR...]: the start of a job's `run` script, on stdout: its output to the
# second serial port, the boot time, the environment (with these variables of this shell), the host
# CA certificates of CA_DIR (the job's ca/ folder) when it holds some (and pip pointed at the system
# bundle), and COMMIT cloned from the job's throttle.bundle to /root/throttle, the working directory.
job_head() {
  local commit=$1 ca_dir=$2 var cas
  shift 2
  echo 'set -u'
  echo 'stty -F /dev/ttyS1 raw -echo 2>/dev/null'
  echo 'exec >/dev/ttyS1 2>&1 </dev/null'
  echo "printf '[vm] booted %s in %s s (uptime)\n' \"\$(uname -r)\" \"\$(cut -d' ' -f1 /proc/uptime)\""
  echo 'export HOME=/root LANG=C.UTF-8 PATH='"$PATH_IN_ROOT"
  for var in "$@"; do
    [ -n "${!var:-}" ] && printf 'export %s=%q\n' "$var" "${!var}"
  done
  cas=$(cd "$ca_dir" 2>/dev/null && ls -- *.crt 2>/dev/null | paste -sd' ' || true)
  if [ -n "$cas" ]; then
    echo 'cp /run/throttle-job/ca/*.crt /usr/local/share/ca-certificates/ && update-ca-certificates >/dev/null 2>&1'
    # pip reads its own bundle, not the system's: point it at the one that now holds these CAs.
    echo 'export PIP_CERT=/etc/ssl/certs/ca-certificates.crt'
    echo "echo '[vm] trusting the host CA certificates: $cas'"
  fi
  echo 'git clone -q --no-checkout /run/throttle-job/throttle.bundle /root/throttle &&'
  echo "  git -C /root/throttle checkout -q --detach $commit || echo '[vm] could not clone the checkout'"
  echo 'cd /root/throttle'
}

# job_tail: the end of a job's `run` script, after its command: the exit code after VM_MARKER.
job_tail() {
  echo 'status=$?'
  echo "sync; printf '\\n%s %d\\n' \"$VM_MARKER\" \"\$status\""
  echo 'exit 0  # the unit powers the VM off when it ends'
}

# job_disk DIR RAW: the job folder DIR as the ext4 disk RAW, labelled throttle-job.
job_disk() {
  local size
  size=$(( $(du -sm "$1" | cut -f1) * 2 + 16 ))M
  mkfs.ext4 -q -F -L throttle-job -d "$1" "$2" "$size" >/dev/null
}

# job_status OUT: the exit code a job wrote to its output file OUT, or nothing.
job_status() {
  grep -aF "$VM_MARKER " "$1" | tail -n 1 | tr -dc 0-9 || true
}
