# Sourced by docker/build-images.sh and docker/smoke-test.sh: podman with
# runc, usable on a fresh Debian machine.
#
# - podman and runc are installed with apt-get when missing.
# - podman's default runtime, crun, cannot set RLIMIT_NOFILE/NPROC under
#   the hybrid cgroup setup of the CI machines; runc can, given limits it
#   may set. A containers.conf of our own (CONTAINERS_CONF, in
#   target/images) picks runc and sets nofile to this shell's hard limit
#   and nproc to 4096 (podman's default, and even this shell's own hard
#   nproc limit, are refused with EPERM on these machines; the tunnel runs
#   a thread per core).
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "==> installing podman and runc (apt-get)"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends podman runc >/dev/null ||
        { $sudo apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends podman runc >/dev/null; }
fi
mkdir -p target/images
cat >target/images/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
CONTAINERS_CONF=$PWD/target/images/containers.conf
export CONTAINERS_CONF
