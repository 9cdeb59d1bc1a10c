#!/bin/sh
# What Debian's packages pull into conveyor's image that it never runs, removed after
# they are installed, on both build paths: by install.sh packages (Containerfile), and
# as mmdebstrap's customize hook (make image), inside the root filesystem. File-level
# cuts are dpkg.cfg's path filters; this removes whole packages.
#
# Nothing installs into this image once it is built, so what only installing needs goes
# too, Essential or not: apt (on the Containerfile path), the package scripts' tools
# (perl-base, debconf, adduser, init-system-helpers) and the tools of a system that
# boots and logs users in (util-linux, login, passwd, PAM, e2fsprogs, mount). What stays
# is what conveyor runs (python3, git with its HTTPS transport, ssh, sh, coreutils) and
# what those link; tests/cluster/test_image.py checks that every ELF file of the image
# finds its libraries. Removed with dpkg, so that the package database (which image
# scanners read) says what is there; dpkg itself stays for that.
set -eu

purge() {
    # --force-depends: what depends on these is removed too, or never runs them.
    dpkg --purge --force-depends --force-remove-essential "$@"
}

# Their removal scripts use the tools removed last (perl, debconf, update-rc.d).
purge apt libapt-pkg6.0 gpgv debian-archive-keyring libseccomp2 libstdc++6 libxxhash0 \
    e2fsprogs logsave libext2fs2 libss2 mount tzdata \
    util-linux-extra util-linux bsdutils sysvinit-utils hostname ncurses-bin \
    login passwd adduser libpam-runtime libpam-modules libpam-modules-bin libpam0g \
    libsemanage2 libsemanage-common libsepol2 libaudit1 libaudit-common libcap-ng0 \
    libsmartcols1 libmount1 libblkid1 libsystemd0 libgcrypt20 libgpg-error0 liblz4-1 \
    libcap2 libgdbm-compat4 libgdbm6 libfido2-1 libcbor0.8 libudev1 libedit2 libbsd0 \
    usrmerge libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl
# git depends on perl (48 MB with its modules) for a few commands only (send-email, svn,
# cvs, instaweb, the old script of add -i): conveyor runs none of them, and git's
# builtins do not need it.
purge perl perl-modules-5.36 libperl5.36 liberror-perl
purge init-system-helpers debconf
purge perl-base
# git ships itself twice, as the command and as git-core's (`git --exec-path`): one
# file, linked twice.
cmp -s /usr/bin/git /usr/lib/git-core/git && ln -f /usr/bin/git /usr/lib/git-core/git
# Python's own test suite and help texts, with their compiled copies: regrtest, pydoc's
# topics (help() in a REPL), turtle graphics, and the pure-Python decimal that _decimal
# stands in for. Here and not in dpkg.cfg, as python3.11's postinst compiles each .py
# file of its package and fails on one that is not there.
stdlib=/usr/lib/python3.11
rm -rf "$stdlib/test" "$stdlib/pydoc_data" "$stdlib/turtle.py" "$stdlib/_pydecimal.py" \
    "$stdlib/__pycache__/turtle."* "$stdlib/__pycache__/_pydecimal."*
# The rest of the pure-Python standard library (23 MB of sources and compiled copies)
# goes into /usr/lib/python311.zip, deflated (7 MB): Python looks there first (it is on
# sys.path before /usr/lib/python3.11, as in Python's embeddable builds), imports from
# it through zipimport, and tracebacks formatted by the traceback module (logging's)
# show the sources from it (rich's and the interpreter's last-resort printer show file
# and line only: they read sources from the file system). Each module is there
# with its bytecode (one level, unoptimised; unchecked hashes, as nothing rebuilds it),
# so nothing compiles at start. What needs its own directory stays: os.py (the landmark
# by which Python finds its prefix), venv (its scripts), lib-dynload (C modules).
python3.11 -E -S - "$stdlib" <<'ZIP'
import pathlib, py_compile, sys, tempfile, zipfile

stdlib = pathlib.Path(sys.argv[1])
archive = stdlib.with_name("python311.zip")
stays = {"lib-dynload", "venv", "site-packages", "dist-packages"}
moved = [
    path for path in sorted(stdlib.rglob("*.py"))
    if path.relative_to(stdlib).parts[0] not in stays and "__pycache__" not in path.parts
]
deflated = {"compression": zipfile.ZIP_DEFLATED, "compresslevel": 9}
with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(archive, "w", **deflated) as zipped:
    compiled = pathlib.Path(scratch) / "module.pyc"
    for path in moved:
        name = str(path.relative_to(stdlib))
        zipped.write(path, name)
        py_compile.compile(
            str(path), cfile=str(compiled), dfile=f"{archive}/{name}", doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        zipped.write(compiled, name + "c")
for path in moved:
    for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        cached.unlink()
    if path != stdlib / "os.py":
        path.unlink()
for folder in sorted((p for p in stdlib.rglob("*") if p.is_dir()), reverse=True):
    if not any(folder.iterdir()):
        folder.rmdir()
ZIP
# What installing left behind: debconf's answers, apt's downloads, dpkg's backups.
rm -rf /var/cache/debconf /var/cache/apt /var/lib/apt /var/lib/dpkg/*-old /var/log/*
