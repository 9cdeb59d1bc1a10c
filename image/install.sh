#!/bin/sh
# One install recipe, run inside the image's root filesystem by the Containerfile's RUN
# steps, on both build paths (podman/docker build, and make image's buildah build).
#
#   install.sh packages            Debian packages from packages.txt (Containerfile path;
#                                  make image hands the same list to mmdebstrap)
#   install.sh deps WHEELHOUSE     Python dependencies from the hashed lock export
#   install.sh conveyor DIST       conveyor's wheel from DIST, on top, resolving nothing
#   install.sh user                the non-root user the image runs as
set -eu

here=$(dirname "$0")
venv=/opt/conveyor

# Debian's pip wheel, run from the wheel file itself (pip supports this), so the venv
# holds only what the lock lists.
pip() {
    set -- /usr/share/python-wheels/pip-*.whl "$@"
    wheel=$1
    shift
    "$venv/bin/python" "$wheel/pip" --disable-pip-version-check --no-cache-dir "$@"
}

case "$1" in
packages)
    # make image's base (mmdebstrap) already holds them, and has no apt to ask.
    # shellcheck disable=SC2046
    if dpkg -s $(grep -v "^#" "$here/packages.txt") >/dev/null 2>&1; then
        exit 0
    fi
    cp "$here/dpkg.cfg" /etc/dpkg/dpkg.cfg.d/conveyor
    apt-get update
    # shellcheck disable=SC2046  # one package per word, on purpose
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        $(grep -v '^#' "$here/packages.txt")
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
    ;;
deps)
    python3 -m venv --without-pip "$venv"
    pip install --no-index --find-links "$2" --require-hashes --no-deps -r "$here/runtime.txt"
    ;;
conveyor)
    pip install --no-index --no-deps "$2"/conveyor-*.whl
    ;;
user)
    grep -q '^conveyor:' /etc/group || echo 'conveyor:x:65532:' >>/etc/group
    grep -q '^conveyor:' /etc/passwd ||
        echo 'conveyor:x:65532:65532:conveyor:/home/conveyor:/usr/sbin/nologin' >>/etc/passwd
    mkdir -p /home/conveyor
    chown 65532:65532 /home/conveyor
    ;;
*)
    echo "install.sh: unknown step $1" >&2
    exit 2
    ;;
esac
