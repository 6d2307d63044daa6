#!/bin/sh
# fieldline's edge agent on a gateway in one command: Raspberry Pi OS 64-bit (Debian 12
# Bookworm, arm64) or any Debian 12. As root, with the wheel from `make dist` beside this script:
#
#   sh install-edge.sh --gateway-id gw-1 --cloud mqtts://cloud.example.net:8883 \
#       --ca ca.crt --cert gw-1.crt --key gw-1.key [--registry devices.csv] [--dry-run]
#   sh install-edge.sh uninstall [--keep-data] [--keep-config]
#
# It installs what is missing of Mosquitto and python3-venv (apt-get), puts the wheel with its
# [edge] dependencies into a virtualenv in $FIELDLINE_PREFIX (/opt/fieldline; arm64 wheels of
# numpy, orjson and paho-mqtt from PyPI, nothing compiled), then runs `fieldline edge install`
# with the arguments given, which does and prints the rest (user, directories, gateway.toml,
# Mosquitto drop-in, ACL and the agent's login, systemd unit). Every step is idempotent: a
# second run changes nothing. A wheel elsewhere: FIELDLINE_WHEEL=/path/to/fieldline-*.whl.
# `uninstall` runs `fieldline edge uninstall` with its arguments, then removes the virtualenv.
set -eu

prefix=${FIELDLINE_PREFIX:-/opt/fieldline}
venv=$prefix/venv
here=$(cd "$(dirname "$0")" && pwd)

say() { printf '%s\n' "install-edge: $*"; }
die() { printf '%s\n' "install-edge: $*" >&2; exit 1; }

dry=""
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

if [ "${1:-}" = "uninstall" ]; then
    shift
    [ -x "$venv/bin/fieldline" ] || die "no fieldline in $venv: nothing to uninstall"
    "$venv/bin/fieldline" edge uninstall "$@"
    if [ -n "$dry" ]; then say "would: remove $prefix"; else rm -rf "$prefix"; say "done: removed $prefix"; fi
    exit 0
fi

[ "$(id -u)" = 0 ] || [ -n "$dry" ] || die "run as root (it creates a system user, /etc and /var/lib entries and a unit)"
case $(uname -m) in
    aarch64|x86_64) ;;
    armv7l|armv6l) die "32-bit ARM is not supported: install Raspberry Pi OS 64-bit (numpy has no 32-bit ARM wheels)" ;;
    *) say "untested architecture $(uname -m): continuing" ;;
esac

wheel=${FIELDLINE_WHEEL:-}
if [ -z "$wheel" ]; then
    for w in "$here"/fieldline-*.whl; do [ -e "$w" ] && wheel=$w; done
fi
[ -n "$wheel" ] && [ -f "$wheel" ] || die "no fieldline wheel beside this script (make dist writes dist/fieldline-*.whl) and FIELDLINE_WHEEL is not set"

missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v mosquitto_sub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$missing python3-venv"
if [ -n "$missing" ]; then
    if [ -n "$dry" ]; then
        say "would: apt-get install$missing"
    else
        say "apt-get install$missing"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    fi
else
    say "unchanged: mosquitto, mosquitto-clients, python3-venv are installed"
fi

if [ -n "$dry" ]; then
    [ -x "$venv/bin/python" ] || say "would: python3 -m venv $venv"
    say "would: $venv/bin/pip install '$wheel[edge]'"
    if [ -x "$venv/bin/fieldline" ]; then
        exec "$venv/bin/fieldline" edge install "$@"
    fi
    say "would: $venv/bin/fieldline edge install $* (its steps are listed once it is installed)"
    exit 0
fi

if [ -x "$venv/bin/python" ]; then
    say "unchanged: virtualenv $venv"
else
    python3 -m venv "$venv"
    say "done: virtualenv $venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=$venv/.fieldline-wheel.sha256
sum=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ -x "$venv/bin/fieldline" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sum" ]; then
    say "unchanged: $(basename "$wheel") with [edge] in $venv"
else
    "$venv/bin/pip" install -q "$wheel[edge]"
    # the same version number built again (a newer checkout) replaces the installed one
    "$venv/bin/pip" install -q --no-deps --force-reinstall "$wheel"
    echo "$sum" > "$stamp"
    say "done: $("$venv/bin/pip" list --format=freeze | grep -E '^(fieldline|numpy|orjson|paho-mqtt)==' | tr '\n' ' ')in $venv"
fi
exec "$venv/bin/fieldline" edge install "$@"
