#!/bin/sh
# One install recipe, run inside the image's root filesystem by the Containerfile's RUN
# steps, on both build paths (podman/docker build, and make image's buildah build).
#
#   install.sh packages            Debian packages from packages.txt, then slim.sh
#                                  (Containerfile path; make image hands the same list
#                                  to mmdebstrap, which runs slim.sh as a customize hook)
#   install.sh deps WHEELHOUSE     Python dependencies from the hashed lock export, then trim
#   install.sh trim SITE_PACKAGES  the parts of them that conveyor never loads
#   install.sh conveyor DIST       conveyor's wheel from DIST, on top, resolving nothing
#   install.sh user                the non-root user the image runs as
set -eu

here=$(dirname "$0")
venv=/opt/conveyor
# The AWS APIs conveyor calls (SQS gates, CloudFormation for ci-privileges) and those
# botocore's credential providers call (STS for IRSA and assumed roles, SSO): botocore's
# models of the other 400 services (28 MB) go. tests/unit/test_image_recipe.py checks
# that every boto3.client() in src/ names one of these.
aws_services="sqs cloudformation sts sso sso-oidc"

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
    sh "$here/slim.sh"
    ;;
deps)
    python3 -m venv --without-pip "$venv"
    pip install --no-index --find-links "$2" --require-hashes --no-deps -r "$here/runtime.txt"
    # In the same step as the install, so the files never reach a layer.
    sh "$0" trim "$venv"/lib/python3.11/site-packages
    ;;
trim)
    site=$2
    for model in "$site"/botocore/data/*/ "$site"/boto3/data/*/; do
        case " $aws_services " in
        *" $(basename "$model") "*) ;;
        *) rm -rf "$model" ;;
        esac
    done
    # Swagger UI: /api/docs loads swagger-ui-bundle.js and swagger-ui.css (see
    # src/conveyor/web/templates/api_docs.html); the source maps and the other builds go.
    rm -f "$site"/swagger_ui_bundle/vendor/*/*.map \
        "$site"/swagger_ui_bundle/vendor/*/swagger-ui-es-bundle*.js \
        "$site"/swagger_ui_bundle/vendor/*/swagger-ui-standalone-preset.js \
        "$site"/swagger_ui_bundle/vendor/*/swagger-ui.js
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
