#!/usr/bin/env bash
# CI only: install and start the Docker engine, Compose v2 and mmdebstrap on a fresh Debian 12 or 13 machine, as
# root, without changing the system's apt sources. The project itself never installs system packages: on a
# user's machine Docker >= 20.10 and Compose v2 are prerequisites of the compose targets (docs/production.md).
#   Debian 13: docker.io + docker-compose (Compose v2) from the system's sources.
#   Debian 12: docker.io from the system's sources; its docker-compose is Compose v1, so Debian 13's Compose v2
#              package (it needs only libc6 >= 2.34) is downloaded with a private apt state and unpacked as the
#              CLI plugin.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
echo "ci: Debian ${VERSION_ID:-?} ($(cat /etc/debian_version))"

packages=()
command -v dockerd >/dev/null || packages+=(docker.io)
command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
compose_v2() { docker compose version 2>/dev/null | grep -q 'version v\?2'; }
if ! compose_v2 && [[ ${VERSION_ID:-} != 12 ]]; then packages+=(docker-compose); fi
if ((${#packages[@]})); then
    echo "ci: apt-get install ${packages[*]}"
    apt-get update -q
    apt-get install -y -q "${packages[@]}"
fi

if ! compose_v2; then
    work=$(mktemp -d)
    echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    apt_private=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
                 -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
    echo "ci: Compose v2 from Debian 13's docker-compose package"
    apt-get -q "${apt_private[@]}" update
    (cd "$work" && apt-get -q "${apt_private[@]}" download docker-compose)
    dpkg-deb -x "$work"/docker-compose_*.deb "$work/x"
    install -D -m 755 "$work/x/usr/libexec/docker/cli-plugins/docker-compose" \
        /usr/libexec/docker/cli-plugins/docker-compose
    rm -rf "$work"
fi

if ! docker info >/dev/null 2>&1; then
    log=/var/log/dockerd-ci.log
    echo "ci: starting dockerd (log $log)"
    nohup dockerd > "$log" 2>&1 &
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5   # polling dockerd's readiness
    done
    docker info >/dev/null 2>&1 || { echo "error: dockerd: not ready after 60 s (log below)"; tail -n 40 "$log"; exit 3; }
fi
echo "ci: $(docker version --format 'Docker {{.Server.Version}}'), $(docker compose version)"
