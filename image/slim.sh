#!/bin/sh
# What Debian's packages pull into conveyor's image that it never runs, removed after
# they are installed, on both build paths: by install.sh packages (Containerfile), and
# as mmdebstrap's customize hook (make image), inside the root filesystem. File-level
# cuts are dpkg.cfg's path filters; this removes whole packages.
set -eu

# git depends on perl (48 MB with its modules) for a few commands only (send-email, svn,
# cvs, instaweb, the old script of add -i): conveyor runs none of them, and git's
# builtins do not need it. Removed with dpkg, so that the package database says what is
# there (apt would ask to put it back: nothing installs into this image afterwards).
# perl-base stays: it is Essential, and debconf needs it.
dpkg --purge --force-depends perl perl-modules-5.36 libperl5.36 liberror-perl
