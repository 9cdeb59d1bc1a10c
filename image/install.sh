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
# Pygments' lexer modules kept by trim: Python's, and those of the text around code.
pygments_lexers="python special data diff shell configs"

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
    # Pygments (which rich requires) colours conveyor's tracebacks, the only code rich
    # highlights: Python, and the text around it. The lexers of the other 500 languages
    # (8 MB) go, and so do their entries in the lexer map, which lookups by name or file
    # name read (rich shows a language not in it as plain text).
    lexers="$site"/pygments/lexers
    for module in "$lexers"/*.py; do
        name=$(basename "$module" .py)
        case " $pygments_lexers __init__ _mapping " in
        *" $name "*) ;;
        *) rm -f "$module" "$lexers/__pycache__/$name".*.pyc ;;
        esac
    done
    python3 - "$lexers/_mapping.py" $pygments_lexers <<'MAP'
import pathlib, py_compile, sys
mapping, kept = pathlib.Path(sys.argv[1]), {f"pygments.lexers.{m}" for m in sys.argv[2:]}
namespace: dict = {}
exec(mapping.read_text(), namespace)
entries = "".join(
    f"    {name!r}: {entry!r},\n" for name, entry in namespace["LEXERS"].items() if entry[0] in kept
)
mapping.write_text(f"# Pygments' map, cut to conveyor's image's lexers.\n\nLEXERS = {{\n{entries}}}\n")
py_compile.compile(str(mapping), doraise=True)
MAP
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
