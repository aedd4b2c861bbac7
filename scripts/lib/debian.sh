# Shell functions shared by scripts/fresh-root-test and scripts/vm (sourced, never run): a Debian 12
# root made with debootstrap, the host's extra CA certificates, a Debian package installed when its
# command is missing, and the commit of the checkout that is copied in. The caller defines say().
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${THROTTLE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PATH_IN_ROOT=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# need_package COMMAND PACKAGE: apt-get install PACKAGE when COMMAND is found nowhere.
need_package() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] && return 0
  say "installing $2 (for $1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null; }
}

# debootstrap_root DIR PACKAGES [DEBOOTSTRAP OPTIONS...]: Debian 12 (minbase plus PACKAGES, comma
# separated) into DIR. debootstrap mounts proc and sys in DIR while it works; it runs in a mount
# namespace of its own, so those mounts vanish with it even when it is killed. Its log is kept
# beside DIR only when it fails.
debootstrap_root() {
  local dir=$1 packages=$2 t=$SECONDS
  shift 2
  need_package debootstrap debootstrap
  say "debootstrap $DEBIAN_SUITE (minbase + $packages) from $DEBIAN_MIRROR into $dir (a few minutes)"
  mkdir -p "$dir"
  PATH=$PATH:/usr/sbin:/sbin unshare --mount --propagation private -- \
    debootstrap --variant=minbase --include="$packages" "$@" "$DEBIAN_SUITE" "$dir" "$DEBIAN_MIRROR" \
    > "$dir.debootstrap.log" 2>&1 ||
    { tail -n 20 "$dir.debootstrap.log" >&2; say "debootstrap failed (its log: $dir.debootstrap.log)"; return 2; }
  rm -f "$dir.debootstrap.log"
  say "debootstrap took $((SECONDS - t)) s"
}

# host_cas: the extra CA certificates this machine trusts (a proxy that re-signs HTTPS), one a line.
host_cas() {
  local crt
  for crt in /usr/local/share/ca-certificates/*.crt; do [ -e "$crt" ] && echo "$crt"; done
  return 0
}

# head_commit REPO: the commit a copy of REPO gets (its HEAD), saying so when uncommitted changes
# stay behind.
head_commit() {
  local commit
  commit=$(git -C "$1" rev-parse HEAD)
  [ -z "$(git -C "$1" status --porcelain --untracked-files=no)" ] ||
    say "note: uncommitted changes in $1 are not in the copy (it is HEAD, $commit)" >&2
  echo "$commit"
}
