#!/usr/bin/env bash
# Packaging test: builds the .deb and .rpm (packaging/build.sh), installs the
# .deb on this machine, checks what it installed, upgrades it over itself
# with an edited config and an existing identity (both must survive),
# removes and purges it, and inspects the .rpm with `rpm -qp`.
#
# Run as root on Debian/Ubuntu: bash tests/packaging.sh
# (or MESHTUN_PACKAGING_TEST=1 cargo test --test packaging).
#
# It leaves the machine as it found it: the package is purged at the end,
# also on failure, and a /var/lib/meshtun or /etc/meshtun that existed before
# is moved aside for the run and put back afterwards. It refuses to run if a
# meshtun package is installed that an earlier run of this script did not
# install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging.sh: needs root (dpkg -i)" >&2
    exit 1
fi
command -v dpkg >/dev/null || { echo "packaging.sh: needs a Debian-based system (dpkg)" >&2; exit 1; }

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
die() { echo "packaging.sh: $*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------
missing=()
command -v rpm >/dev/null || missing+=(rpm)
command -v man >/dev/null || missing+=(man-db)
command -v strip >/dev/null || missing+=(binutils)
command -v setpriv >/dev/null || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "packaging.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    }
fi

# --- leave the machine as we found it ------------------------------------------
MARK=/var/lib/meshtun/.packaging-test
work=$(mktemp -d /tmp/meshtun-packaging.XXXXXX)
backup="/var/tmp/meshtun-packaging-backup.$$"
status=$(dpkg-query -W -f='${db:Status-Status}' meshtun 2>/dev/null || true)
if [ -n "$status" ] && [ "$status" != "not-installed" ]; then
    if [ -e "$MARK" ]; then
        echo "packaging.sh: purging the package an interrupted earlier run left"
        dpkg --purge meshtun >/dev/null
        rm -rf /var/lib/meshtun /etc/meshtun
    else
        die "a meshtun package is installed here ($status) that this test did not install; refusing to touch it"
    fi
fi
[ -e "$MARK" ] && rm -rf /var/lib/meshtun
for dir in /var/lib/meshtun /etc/meshtun; do
    if [ -e "$dir" ]; then
        mkdir -p "$backup"
        echo "packaging.sh: moving the existing $dir aside to $backup for the run"
        mv "$dir" "$backup/$(echo "${dir#/}" | tr / -)"
    fi
done

cleanup() {
    local rc=$?
    dpkg --purge meshtun >/dev/null 2>&1 || true
    rm -rf /var/lib/meshtun /etc/meshtun "$work"
    if [ -d "$backup" ]; then
        [ -e "$backup/var-lib-meshtun" ] && mv "$backup/var-lib-meshtun" /var/lib/meshtun
        [ -e "$backup/etc-meshtun" ] && mv "$backup/etc-meshtun" /etc/meshtun
        rmdir "$backup"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ----------------------------------------------------------------------
start=$(date +%s)
bash packaging/build.sh
echo "packaging.sh: packages built in $(($(date +%s) - start)) s"
deb=$(ls target/debian/meshtun_*.deb)
rpm=$(ls target/generate-rpm/meshtun-*.rpm)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || die "cannot read the version from Cargo.toml"

# --- install the .deb -----------------------------------------------------------
echo "== dpkg -i $deb"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" </dev/null
touch "$MARK"

check "meshtun --version prints $version" \
    test "$(meshtun --version)" = "meshtun $version"
check "the installed binary is /usr/bin/meshtun" test "$(command -v meshtun)" = /usr/bin/meshtun
check "meshtun config check accepts the shipped config" \
    sh -c 'meshtun config check /etc/meshtun/meshtun.toml | grep -qx "/etc/meshtun/meshtun.toml: OK"'
check "meshtun config check --backbone accepts the shipped backbone config" \
    meshtun config check --backbone /etc/meshtun/backbone.toml
check "config check needs no root" \
    setpriv --reuid=nobody --regid=nogroup --clear-groups meshtun config check /etc/meshtun/meshtun.toml
check "/var/lib/meshtun is created with mode 700" test "$(stat -c %a /var/lib/meshtun)" = 700
check "both config files are conffiles" \
    sh -c 'test "$(dpkg-query --control-show meshtun conffiles | cut -d" " -f2 | sort | tr "\n" " ")" = "/etc/meshtun/backbone.toml /etc/meshtun/meshtun.toml "'

# A bad config is reported with its place, and exits 78 (EX_CONFIG).
printf 'backbones = ["198.18.0.1:7400"]\nmtu = 70000\n' >"$work/bad.toml"
set +e
out=$(meshtun config check "$work/bad.toml" 2>&1)
rc=$?
set -e
check "config check reports a bad value with file, line and range (exit 78)" \
    test "$rc:$out" = "78:meshtun: error: $work/bad.toml:2:7: invalid value for \`mtu\`: 70000 is not in 1280..=9000"

# Man pages and completions.
if grep -rqs '^path-exclude=/usr/share/man' /etc/dpkg/dpkg.cfg.d/; then
    echo "note: dpkg here excludes /usr/share/man; checking the package contents instead"
    check "the .deb ships meshtun.1.gz" sh -c "dpkg-deb -c '$deb' | grep -q './usr/share/man/man1/meshtun.1.gz'"
else
    check "man -w meshtun finds the page" test "$(man -w meshtun)" = /usr/share/man/man1/meshtun.1.gz
    check "man -w meshtun-up finds the subcommand page" test "$(man -w meshtun-up)" = /usr/share/man/man1/meshtun-up.1.gz
    check "the man page documents the config file" \
        sh -c 'zcat /usr/share/man/man1/meshtun.1.gz | grep -q "/etc/meshtun/meshtun.toml"'
    check "the up page documents --config" \
        sh -c 'zcat /usr/share/man/man1/meshtun-up.1.gz | grep -q "config"'
fi
check "bash completion is installed and parses" \
    bash -n /usr/share/bash-completion/completions/meshtun
check "bash completion completes subcommands" \
    bash -c 'source /usr/share/bash-completion/completions/meshtun; COMP_WORDS=(meshtun con); COMP_CWORD=1; COMP_LINE="meshtun con"; COMP_POINT=11; _meshtun meshtun con meshtun; [[ " ${COMPREPLY[*]} " == *" config "* ]]'
check "zsh completion is installed" grep -q '^#compdef meshtun' /usr/share/zsh/vendor-completions/_meshtun
check "fish completion is installed" grep -q 'complete -c meshtun' /usr/share/fish/vendor_completions.d/meshtun.fish

# systemd units.
units=(/lib/systemd/system/meshtun.service /lib/systemd/system/meshtun-backbone.service)
if command -v systemd-analyze >/dev/null; then
    for unit in "${units[@]}"; do
        check "systemd-analyze verify $(basename "$unit")" \
            sh -c "systemd-analyze verify '$unit' >'$work/verify.log' 2>&1 && ! grep -Eiq 'unknown|invalid|fail|warn' '$work/verify.log' || { cat '$work/verify.log' >&2; false; }"
    done
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
        for unit in meshtun.service meshtun-backbone.service; do
            exposure=$(systemd-analyze security --offline=true --root=/ "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
            echo "note: systemd-analyze security: $unit exposure $exposure"
            check "$unit exposure level is below 5.0 (systemd-analyze security)" \
                awk -v e="$exposure" 'BEGIN { exit !(e != "" && e < 5.0) }'
        done
    fi
else
    echo "note: systemd-analyze not available; checking the unit files' contents"
fi
node=/lib/systemd/system/meshtun.service
for line in 'ExecStart=/usr/bin/meshtun up --config /etc/meshtun/meshtun.toml' \
    'Restart=on-failure' 'RestartPreventExitStatus=78' \
    'StateDirectory=meshtun' 'StateDirectoryMode=0700' 'RuntimeDirectory=meshtun' \
    'CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE' 'AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE' \
    'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK' 'DeviceAllow=/dev/net/tun rw' \
    'ProtectSystem=strict' 'ProtectHome=yes' 'NoNewPrivileges=yes'; do
    check "meshtun.service has $line" grep -qxF "$line" "$node"
done
check "meshtun.service does not make /proc/sys read-only (the daemon writes IPv6 sysctls)" \
    sh -c "! grep -Eq '^(ProtectKernelTunables=yes|ProcSubset=pid|PrivateDevices=yes)' '$node'"
check "meshtun-backbone.service runs meshtun backbone with /etc/meshtun/backbone.toml and keeps hostname bindings in its StateDirectory" \
    sh -c "grep -qxF 'ExecStart=/usr/bin/meshtun backbone --config /etc/meshtun/backbone.toml --state-dir /var/lib/meshtun-backbone' /lib/systemd/system/meshtun-backbone.service \
        && grep -qxF 'StateDirectory=meshtun-backbone' /lib/systemd/system/meshtun-backbone.service"
# Restart budget: at RestartSec the most starts in one StartLimitIntervalSec
# window is interval/RestartSec + 1; it must stay below StartLimitBurst.
for unit in "${units[@]}"; do
    check "$(basename "$unit"): restarts never reach the start limit" awk -F= '
        $1 == "RestartSec" { sub(/s$/, "", $2); r = $2 }
        $1 == "StartLimitIntervalSec" { i = $2 }
        $1 == "StartLimitBurst" { b = $2 }
        END { exit !(r > 0 && i > 0 && b > 0 && int(i / r) + 1 < b) }' "$unit"
done
check "the units are not enabled on install" \
    sh -c '! ls /etc/systemd/system/multi-user.target.wants/ 2>/dev/null | grep -q meshtun'

# --- upgrade over itself: edited config and identity survive ----------------------
meshtun id --state-dir /var/lib/meshtun >"$work/id-before"   # creates the identity
# `meshtun up` would create the WireGuard key; write one the same way (64 hex digits, 0600).
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >/var/lib/meshtun/wireguard.key && echo >>/var/lib/meshtun/wireguard.key)
printf '\n# edited by the packaging test\nmtu = 1400\nbackbones = ["198.18.0.1:7400"]\n' >>/etc/meshtun/meshtun.toml
sha256sum /etc/meshtun/meshtun.toml /var/lib/meshtun/identity /var/lib/meshtun/wireguard.key >"$work/sums"
chmod 0755 /var/lib/meshtun
echo "== dpkg -i $deb (upgrade over itself)"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" </dev/null
check "upgrade keeps the edited config, the identity and the WireGuard key byte for byte" sha256sum --quiet -c "$work/sums"
check "upgrade keeps the mesh address" sh -c "meshtun id --state-dir /var/lib/meshtun | cmp -s - '$work/id-before'"
check "upgrade restores mode 700 on /var/lib/meshtun" test "$(stat -c %a /var/lib/meshtun)" = 700
check "the edited config still passes config check" meshtun config check /etc/meshtun/meshtun.toml

# --- remove and purge -------------------------------------------------------
echo "== dpkg -r meshtun"
dpkg -r meshtun
check "dpkg -r removes the binary" test ! -e /usr/bin/meshtun
check "dpkg -r removes the units" test ! -e /lib/systemd/system/meshtun.service
check "dpkg -r removes the man page" test ! -e /usr/share/man/man1/meshtun.1.gz
check "dpkg -r keeps the identity" sha256sum --quiet -c <(grep /var/lib/meshtun/identity "$work/sums")
check "dpkg -r keeps the edited config (conffile)" sha256sum --quiet -c <(grep /etc/meshtun/meshtun.toml "$work/sums")
check "dpkg -r leaves the package in state config-files" \
    test "$(dpkg-query -W -f='${db:Status-Status}' meshtun)" = config-files
echo "== dpkg --purge meshtun"
dpkg --purge meshtun
check "dpkg --purge removes /etc/meshtun" test ! -e /etc/meshtun
check "dpkg --purge still keeps the identity (documented: the address cannot be recovered)" \
    sha256sum --quiet -c <(grep /var/lib/meshtun/identity "$work/sums")
check "the package is gone" sh -c '! dpkg-query -W -f="\${db:Status-Status}" meshtun 2>/dev/null | grep -q installed'

# --- the .rpm -----------------------------------------------------------------
echo "== rpm -qp $rpm"
rpm -qp --list "$rpm" >"$work/rpm-list"
cat >"$work/rpm-expected" <<'LIST'
/etc/meshtun/backbone.toml
/etc/meshtun/meshtun.toml
/usr/bin/meshtun
/usr/lib/systemd/system/meshtun-backbone.service
/usr/lib/systemd/system/meshtun.service
/usr/share/bash-completion/completions/meshtun
/usr/share/doc/meshtun/README.md
/usr/share/doc/meshtun/examples/backbone.toml
/usr/share/doc/meshtun/examples/meshtun.toml
/usr/share/fish/vendor_completions.d/meshtun.fish
/usr/share/man/man1/meshtun-backbone.1.gz
/usr/share/man/man1/meshtun-config-check.1.gz
/usr/share/man/man1/meshtun-config.1.gz
/usr/share/man/man1/meshtun-down.1.gz
/usr/share/man/man1/meshtun-id.1.gz
/usr/share/man/man1/meshtun-netcheck.1.gz
/usr/share/man/man1/meshtun-status.1.gz
/usr/share/man/man1/meshtun-up.1.gz
/usr/share/man/man1/meshtun.1.gz
/usr/share/zsh/site-functions/_meshtun
LIST
# Subcommands come and go; compare everything but the subcommand man pages exactly.
check "rpm file list is as expected" \
    diff <(grep -v 'man1/meshtun-' "$work/rpm-expected") <(grep -v 'man1/meshtun-' "$work/rpm-list" | sort)
check "rpm has a man page for every visible subcommand (up, backbone, config check)" \
    sh -c "grep -q man1/meshtun-up.1.gz '$work/rpm-list' && grep -q man1/meshtun-backbone.1.gz '$work/rpm-list' && grep -q man1/meshtun-config-check.1.gz '$work/rpm-list'"
check "rpm marks both config files %config(noreplace)" \
    sh -c "test \"\$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpm' | grep ' /etc/')\" = \"\$(printf 'cn /etc/meshtun/meshtun.toml\ncn /etc/meshtun/backbone.toml')\" || test \"\$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpm' | grep ' /etc/' | sort)\" = \"\$(printf 'cn /etc/meshtun/backbone.toml\ncn /etc/meshtun/meshtun.toml')\""
rpm -qp --scripts "$rpm" >"$work/rpm-scripts"
check "rpm postinstall creates /var/lib/meshtun 0700" \
    sh -c "sed -n '/^postinstall scriptlet/,/^preuninstall scriptlet/p' '$work/rpm-scripts' | grep -q 'install -d -m 0700 -o root -g root /var/lib/meshtun'"
check "rpm preuninstall stops and disables the units on erase only" \
    sh -c "sed -n '/^preuninstall/,/^postuninstall/p' '$work/rpm-scripts' | grep -q 'if \[ \"\$1\" -eq 0 \]' && sed -n '/^preuninstall/,/^postuninstall/p' '$work/rpm-scripts' | grep -q 'systemctl stop meshtun.service meshtun-backbone.service' && sed -n '/^preuninstall/,/^postuninstall/p' '$work/rpm-scripts' | grep -q 'systemctl disable'"
check "rpm postuninstall restarts on upgrade" \
    sh -c "sed -n '/^postuninstall/,\$p' '$work/rpm-scripts' | grep -q 'try-restart'"
check "rpm scriptlets do not fail without systemd (guarded by /run/systemd/system)" \
    sh -c "grep -c 'if \[ -d /run/systemd/system \]' '$work/rpm-scripts' | grep -qx 3"
check "rpm scriptlets run with /bin/sh" \
    sh -c "test \$(grep -c 'scriptlet (using /bin/sh):' '$work/rpm-scripts') -eq 3"
rpm -qp --requires "$rpm" >"$work/rpm-requires"
check "rpm requires /bin/sh (scriptlets)" grep -qx '/bin/sh' "$work/rpm-requires"
check "rpm requires glibc (libc.so.6)" grep -q '^libc.so.6' "$work/rpm-requires"
check "rpm requires nothing unexpected" \
    sh -c "! grep -Ev '^(/bin/sh|lib(c|m|gcc_s|pthread|dl|rt)\.so\.[0-9]+.*|ld-linux.*|rpmlib\(.*|rtld\(GNU_HASH\)|config\(meshtun\) = .*)\$' '$work/rpm-requires'"
check "rpm version is $version" test "$(rpm -qp --qf '%{VERSION}' "$rpm")" = "$version"

# The maintainer scripts are valid POSIX sh (the rpm ones are run by /bin/sh).
for script in packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm packaging/rpm/*.sh; do
    check "$script is valid sh" sh -n "$script"
done

echo
echo "packaging: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
