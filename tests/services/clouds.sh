#!/usr/bin/env bash
# Real cloud servers for vmcast's tests, all on loopback:
#   * OpenStack Keystone (identity) under gunicorn, sqlite-backed
#   * OpenStack Glance (image service) under gunicorn, sqlite + filesystem store,
#     authenticating through Keystone with keystonemiddleware
#   * moto_server (EC2, EBS direct APIs, S3, ...) standing in for AWS
#
# Usage: clouds.sh install|start|stop|status|env [SERVICE...]
#   SERVICE is keystone, glance or moto (default: all three; glance needs keystone).
#
# Everything lives under $VMCAST_SERVICES_DIR (default /var/tmp/vmcast-services): its own
# virtualenv, configs, sqlite databases, image store, logs and pid files. Nothing is installed
# into the system Python. Every command is idempotent.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES_DIR="${VMCAST_SERVICES_DIR:-/var/tmp/vmcast-services}"
VENV="${SERVICES_DIR}/venv"
RUN_DIR="${SERVICES_DIR}/run"
LOG_DIR="${SERVICES_DIR}/logs"
KEYSTONE_DIR="${SERVICES_DIR}/keystone"
GLANCE_DIR="${SERVICES_DIR}/glance"
CLOUDS_YAML="${SERVICES_DIR}/clouds.yaml"

# Interpreter used only to create the virtualenv (keystone 30 / glance 33 need >= 3.10).
BASE_PYTHON="${VMCAST_SERVICES_PYTHON:-python3}"

HOST=127.0.0.1
KEYSTONE_PORT="${VMCAST_KEYSTONE_PORT:-35357}"
GLANCE_PORT="${VMCAST_GLANCE_PORT:-9292}"
MOTO_PORT="${VMCAST_MOTO_PORT:-5555}"
KEYSTONE_URL="http://${HOST}:${KEYSTONE_PORT}"
GLANCE_URL="http://${HOST}:${GLANCE_PORT}"
MOTO_URL="http://${HOST}:${MOTO_PORT}"

REGION=RegionOne
ADMIN_PASSWORD="${VMCAST_ADMIN_PASSWORD:-vmcast-admin-secret}"
GLANCE_SERVICE_PASSWORD="${VMCAST_GLANCE_PASSWORD:-vmcast-glance-secret}"
READY_TIMEOUT="${VMCAST_SERVICES_TIMEOUT:-120}"

# Known-good versions. The constraints file (a `pip freeze` of a venv that passed
# tests/services) keeps transitive oslo/SQLAlchemy/... releases from drifting under us, the way
# OpenStack's own upper-constraints do. VMCAST_SERVICES_CONSTRAINTS=none installs unpinned.
REQUIREMENTS=(
    "keystone==30.0.0"      # 2026.x series
    "glance==33.0.0"        # 2026.x series; no standalone server any more, WSGI only
    "gunicorn>=23"
    "moto[server]>=5.1"
)
CONSTRAINTS="${VMCAST_SERVICES_CONSTRAINTS:-${SCRIPT_DIR}/constraints.txt}"
INSTALL_STAMP="${VENV}/.vmcast-services-installed"

ALL_SERVICES=(keystone glance moto)

log() { printf '[clouds.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ----------------------------------------------------------------------------------- install

install_stamp_content() {
    # Re-install whenever the requested set changes.
    local c=""
    [[ "$CONSTRAINTS" != none && -f "$CONSTRAINTS" ]] && c="$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"
    printf '%s\n' "${REQUIREMENTS[@]}" "constraints=${c}"
}

is_installed() {
    [[ -x "${VENV}/bin/python" && -f "$INSTALL_STAMP" ]] &&
        [[ "$(cat "$INSTALL_STAMP")" == "$(install_stamp_content)" ]]
}

apt_install() {
    # Install Debian packages, refreshing the package lists only if a package is not found.
    log "apt-get install $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    fi
}

cmd_install() {
    if is_installed; then
        log "already installed in ${VENV}"
        return 0
    fi
    mkdir -p "$SERVICES_DIR"
    command -v "$BASE_PYTHON" >/dev/null || apt_install python3
    # Debian's python3 ships venv/ensurepip separately.
    if ! "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    "$BASE_PYTHON" - <<'EOF' || die "need Python >= 3.10 for keystone/glance (set VMCAST_SERVICES_PYTHON)"
import sys; sys.exit(sys.version_info < (3, 10))
EOF
    log "creating virtualenv ${VENV}"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    "${VENV}/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 |
        grep -v "is ignored: it is neither" >&2 || true
    local pip_args=(install --disable-pip-version-check --progress-bar off)
    if [[ "$CONSTRAINTS" != none && -f "$CONSTRAINTS" ]]; then
        pip_args+=(-c "$CONSTRAINTS")
    fi
    log "pip installing ${REQUIREMENTS[*]} (takes about a minute)"
    local pip_log="${SERVICES_DIR}/pip-install.log"
    if ! "${VENV}/bin/python" -m pip "${pip_args[@]}" "${REQUIREMENTS[@]}" >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip install failed (full log: ${pip_log})"
    fi
    install_stamp_content >"$INSTALL_STAMP"
    log "installed: $("${VENV}/bin/python" -m pip list 2>/dev/null |
        awk '$1 ~ /^(keystone|glance|gunicorn|moto)$/ {printf "%s %s  ", $1, $2}')"
}

# ------------------------------------------------------------------------- process helpers

pid_file() { echo "${RUN_DIR}/$1.pid"; }

# Prints the pid of a service we started, if that process is still alive and still ours
# (its command line must name our services dir or our gunicorn title: guards against pid reuse).
running_pid() {
    local pf pid cmdline
    pf="$(pid_file "$1")"
    [[ -f "$pf" ]] || return 1
    pid="$(cat "$pf")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline="$(tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null)" || return 1
    # gunicorn retitles itself "gunicorn: master [vmcast-NAME]"; moto keeps its argv.
    [[ "$cmdline" == *"${SERVICES_DIR}"* || "$cmdline" == *"[vmcast-$1]"* ]] || return 1
    echo "$pid"
}

url_of() {
    case "$1" in
        keystone) echo "${KEYSTONE_URL}/v3" ;;
        glance) echo "${GLANCE_URL}/healthcheck" ;;
        moto) echo "${MOTO_URL}/moto-api/" ;;
    esac
}

port_of() {
    case "$1" in
        keystone) echo "$KEYSTONE_PORT" ;;
        glance) echo "$GLANCE_PORT" ;;
        moto) echo "$MOTO_PORT" ;;
    esac
}

# True if the URL answers with any HTTP status below 500. Uses Python (always there) rather than
# curl so the script has no extra dependency.
answers() {
    "$BASE_PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=3)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
except Exception:
    sys.exit(1)
EOF
}

port_in_use() {
    "$BASE_PYTHON" - "$HOST" "$1" <<'EOF'
import socket, sys
s = socket.socket()
# Like gunicorn, so sockets of a just-stopped server in TIME_WAIT do not count as "in use".
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOF
}

# spawn NAME CMD...: start CMD in the background, in its own session (so a Ctrl-C in the
# terminal or pytest does not reach it, and stop can reap its whole process group), with
# stdout/stderr going to logs/NAME.log. Without job control `setsid` execs in place, so $!
# is the service's own pid.
spawn() {
    local name="$1"; shift
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    local port
    port="$(port_of "$name")"
    if port_in_use "$port"; then
        die "port ${HOST}:${port} for ${name} is taken by a process this script did not start" \
            "(stop it, or set VMCAST_${name^^}_PORT)"
    fi
    printf '\n===== %s starting %s =====\n' "$(date -Is)" "$name" >>"${LOG_DIR}/${name}.log"
    # 9>&-: the long-lived server must not inherit (and so hold) the lock from take_lock.
    setsid "$@" >>"${LOG_DIR}/${name}.log" 2>&1 </dev/null 9>&- &
    echo $! >"$(pid_file "$name")"
    log "started ${name} (pid $!, port ${port}, log ${LOG_DIR}/${name}.log)"
    # Machine-readable, on stdout: tells a caller (the pytest fixtures) exactly what this run
    # started and so must stop, even if a later step fails.
    echo "spawned ${name}"
}

wait_ready() {
    local name="$1" url deadline
    url="$(url_of "$name")"
    deadline=$((SECONDS + READY_TIMEOUT))
    until answers "$url"; do
        if ! running_pid "$name" >/dev/null; then
            tail -n 40 "${LOG_DIR}/${name}.log" >&2 || true
            die "${name} exited during startup (log: ${LOG_DIR}/${name}.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "${LOG_DIR}/${name}.log" >&2 || true
            die "${name} did not answer ${url} within ${READY_TIMEOUT}s (log: ${LOG_DIR}/${name}.log)"
        fi
        sleep 0.5
    done
    log "${name} answers at ${url}"
}

# -------------------------------------------------------------------------------- keystone

write_keystone_config() {
    # Keystone warns about (and real deployments forbid) world-readable key repositories.
    mkdir -p "${KEYSTONE_DIR}/fernet-keys" "${KEYSTONE_DIR}/credential-keys" \
        "${KEYSTONE_DIR}/receipt-keys"
    chmod 700 "${KEYSTONE_DIR}/fernet-keys" "${KEYSTONE_DIR}/credential-keys" \
        "${KEYSTONE_DIR}/receipt-keys"
    cat >"${KEYSTONE_DIR}/keystone.conf" <<EOF
# Generated by tests/services/clouds.sh; rewritten on every start.
[DEFAULT]
debug = false
use_stderr = true

[database]
connection = sqlite:///${KEYSTONE_DIR}/keystone.db

[token]
provider = fernet

[fernet_tokens]
key_repository = ${KEYSTONE_DIR}/fernet-keys

[fernet_receipts]
key_repository = ${KEYSTONE_DIR}/receipt-keys

[credential]
key_repository = ${KEYSTONE_DIR}/credential-keys

[identity]
# bcrypt's minimum cost: every test authenticates, and the default (12) costs ~0.25 s a login.
password_hash_rounds = 4
EOF
    # Keystone's Flask app parses sys.argv through oslo.config, so gunicorn's own arguments
    # must be hidden from it before the app is built.
    cat >"${KEYSTONE_DIR}/keystone_wsgi.py" <<EOF
# Generated by tests/services/clouds.sh: WSGI entry point for Keystone under gunicorn.
import os
import sys

os.environ.setdefault("OS_KEYSTONE_CONFIG_DIR", "${KEYSTONE_DIR}")
sys.argv = [sys.argv[0]]

from keystone.server.wsgi import initialize_public_application  # noqa: E402

application = initialize_public_application()
EOF
}

keystone_manage() {
    "${VENV}/bin/keystone-manage" --config-file "${KEYSTONE_DIR}/keystone.conf" "$@" \
        >>"${LOG_DIR}/keystone-manage.log" 2>&1 ||
        { tail -n 30 "${LOG_DIR}/keystone-manage.log" >&2; die "keystone-manage $1 failed"; }
}

start_keystone() {
    if running_pid keystone >/dev/null; then
        log "keystone already running (pid $(running_pid keystone))"
        return 0
    fi
    mkdir -p "$LOG_DIR"
    write_keystone_config
    log "keystone: db_sync, fernet/credential keys, bootstrap"
    keystone_manage db_sync
    local owner=(--keystone-user "$(id -un)" --keystone-group "$(id -gn)")
    # The setup commands keep existing keys; only an empty repository gets new ones.
    [[ -f "${KEYSTONE_DIR}/fernet-keys/0" ]] || keystone_manage fernet_setup "${owner[@]}"
    [[ -f "${KEYSTONE_DIR}/credential-keys/0" ]] || keystone_manage credential_setup "${owner[@]}"
    [[ -f "${KEYSTONE_DIR}/receipt-keys/0" ]] || keystone_manage receipt_setup "${owner[@]}"
    # bootstrap is idempotent: it creates what is missing and updates the endpoint URLs.
    keystone_manage bootstrap \
        --bootstrap-password "$ADMIN_PASSWORD" \
        --bootstrap-username admin \
        --bootstrap-project-name admin \
        --bootstrap-role-name admin \
        --bootstrap-service-name keystone \
        --bootstrap-region-id "$REGION" \
        --bootstrap-admin-url "${KEYSTONE_URL}/v3" \
        --bootstrap-internal-url "${KEYSTONE_URL}/v3" \
        --bootstrap-public-url "${KEYSTONE_URL}/v3"
    spawn keystone "${VENV}/bin/gunicorn" \
        --bind "${HOST}:${KEYSTONE_PORT}" \
        --chdir "$KEYSTONE_DIR" \
        --workers 2 --threads 4 --timeout 120 \
        --name vmcast-keystone \
        "${GUNICORN_EXTRA[@]}" \
        keystone_wsgi:application
}

# gunicorn >= 24 opens a control socket in the working directory by default; we need none.
GUNICORN_EXTRA=()
set_gunicorn_extra_args() {
    GUNICORN_EXTRA=()
    # Capture first: `--help | grep -q` would die of SIGPIPE and fail under pipefail.
    local help
    help="$("${VENV}/bin/gunicorn" --help 2>/dev/null || true)"
    if [[ "$help" == *--no-control-socket* ]]; then
        GUNICORN_EXTRA+=(--no-control-socket)
    fi
}

# Makes the glance service user and the image catalog entry exist, as a deployment tool would.
# Idempotent; endpoint URLs are updated if the port changed.
register_glance_in_keystone() {
    log "keystone: ensuring glance service user and image endpoints"
    OS_AUTH_URL="${KEYSTONE_URL}/v3" ADMIN_PASSWORD="$ADMIN_PASSWORD" \
        GLANCE_SERVICE_PASSWORD="$GLANCE_SERVICE_PASSWORD" GLANCE_URL="$GLANCE_URL" \
        REGION="$REGION" "${VENV}/bin/python" - <<'EOF' >>"${LOG_DIR}/keystone-manage.log" 2>&1 ||
import os
import openstack

conn = openstack.connect(
    auth_url=os.environ["OS_AUTH_URL"], username="admin", password=os.environ["ADMIN_PASSWORD"],
    project_name="admin", user_domain_name="Default", project_domain_name="Default",
    region_name=os.environ["REGION"], interface="public", identity_api_version="3",
)
idp = conn.identity
domain = idp.find_domain("default", ignore_missing=False)

service_project = idp.find_project("service", domain_id=domain.id) or idp.create_project(
    name="service", domain_id=domain.id, description="Service users")
user = idp.find_user("glance", domain_id=domain.id)
if user is None:
    user = idp.create_user(name="glance", domain_id=domain.id,
                           password=os.environ["GLANCE_SERVICE_PASSWORD"],
                           default_project_id=service_project.id)
else:
    user = idp.update_user(user, password=os.environ["GLANCE_SERVICE_PASSWORD"])
# keystonemiddleware validates user tokens with this account, which needs the service role;
# admin lets glance act on any project, as in a real deployment.
for role_name in ("admin", "service"):
    role = idp.find_role(role_name) or idp.create_role(name=role_name)
    idp.assign_project_role_to_user(service_project, user, role)

service = next(iter(idp.services(type="image")), None) or idp.create_service(
    name="glance", type="image", description="OpenStack Image", enabled=True)
wanted = {"public": os.environ["GLANCE_URL"], "internal": os.environ["GLANCE_URL"],
          "admin": os.environ["GLANCE_URL"]}
existing = {e.interface: e for e in idp.endpoints(service_id=service.id)}
for interface, url in wanted.items():
    endpoint = existing.get(interface)
    if endpoint is None:
        idp.create_endpoint(service_id=service.id, interface=interface, url=url,
                            region_id=os.environ["REGION"], enabled=True)
    elif endpoint.url != url or endpoint.region_id != os.environ["REGION"]:
        idp.update_endpoint(endpoint, url=url, region_id=os.environ["REGION"])
print("glance registered in keystone:", service.id)
EOF
        { tail -n 30 "${LOG_DIR}/keystone-manage.log" >&2; die "registering glance in keystone failed"; }
}

# ---------------------------------------------------------------------------------- glance

write_glance_config() {
    mkdir -p "${GLANCE_DIR}/images" "${GLANCE_DIR}/staging" "${GLANCE_DIR}/tasks" \
        "${GLANCE_DIR}/locks"
    # The stock paste pipeline, but its healthcheck looks for a disable file under /etc/glance.
    sed "s|^disable_by_file_path = .*|disable_by_file_path = ${GLANCE_DIR}/healthcheck_disable|" \
        "${VENV}/etc/glance/glance-api-paste.ini" >"${GLANCE_DIR}/glance-api-paste.ini"
    cat >"${GLANCE_DIR}/glance-api.conf" <<EOF
# Generated by tests/services/clouds.sh; rewritten on every start.
[DEFAULT]
debug = false
use_stderr = true
enabled_backends = local:file
# Where glance reaches itself for distributed image import.
worker_self_reference_url = ${GLANCE_URL}
public_endpoint = ${GLANCE_URL}
# Uploads go to the store directly, and image import (web-download etc.) is not used by vmcast.
enabled_import_methods = [glance-direct]
node_staging_uri = file://${GLANCE_DIR}/staging

[database]
connection = sqlite:///${GLANCE_DIR}/glance.db

[glance_store]
default_backend = local

[local]
filesystem_store_datadir = ${GLANCE_DIR}/images

[os_glance_staging_store]
filesystem_store_datadir = ${GLANCE_DIR}/staging

[os_glance_tasks_store]
filesystem_store_datadir = ${GLANCE_DIR}/tasks

[oslo_concurrency]
lock_path = ${GLANCE_DIR}/locks

[paste_deploy]
flavor = keystone
config_file = ${GLANCE_DIR}/glance-api-paste.ini

[keystone_authtoken]
www_authenticate_uri = ${KEYSTONE_URL}/v3
auth_url = ${KEYSTONE_URL}/v3
auth_type = password
user_domain_name = Default
project_domain_name = Default
project_name = service
username = glance
password = ${GLANCE_SERVICE_PASSWORD}
region_name = ${REGION}
interface = public
# No memcached here: keystonemiddleware caches validated tokens in-process.
EOF
}

start_glance() {
    if running_pid glance >/dev/null; then
        log "glance already running (pid $(running_pid glance))"
        return 0
    fi
    answers "$(url_of keystone)" || die "glance needs keystone running"
    mkdir -p "$LOG_DIR"
    write_glance_config
    register_glance_in_keystone
    log "glance: db_sync"
    OS_GLANCE_CONFIG_DIR="$GLANCE_DIR" "${VENV}/bin/glance-manage" \
        --config-file "${GLANCE_DIR}/glance-api.conf" db_sync >>"${LOG_DIR}/glance-manage.log" 2>&1 ||
        { tail -n 30 "${LOG_DIR}/glance-manage.log" >&2; die "glance-manage db_sync failed"; }
    # One worker process: glance's sqlite database and in-process task pool prefer a single
    # writer; threads give concurrency for parallel uploads.
    OS_GLANCE_CONFIG_DIR="$GLANCE_DIR" spawn glance "${VENV}/bin/gunicorn" \
        --bind "${HOST}:${GLANCE_PORT}" \
        --chdir "$GLANCE_DIR" \
        --workers 1 --worker-class gthread --threads 8 --timeout 600 \
        --name vmcast-glance \
        "${GUNICORN_EXTRA[@]}" \
        glance.wsgi.api:application
}

# ------------------------------------------------------------------------------------ moto

start_moto() {
    if running_pid moto >/dev/null; then
        log "moto already running (pid $(running_pid moto))"
        return 0
    fi
    mkdir -p "$LOG_DIR"
    # No default AMIs: keeps startup fast and DescribeImages showing only what tests made.
    MOTO_EC2_LOAD_DEFAULT_AMIS=false spawn moto "${VENV}/bin/moto_server" \
        -H "$HOST" -p "$MOTO_PORT"
}

# -------------------------------------------------------------------------------- commands

# Expands the requested service names (none means all) into dependency order. With
# --with-deps, glance pulls in keystone (for start; stopping glance leaves keystone alone).
resolve_services() {
    local with_deps=false
    if [[ "${1:-}" == --with-deps ]]; then with_deps=true; shift; fi
    local want=("$@") out=() s
    ((${#want[@]})) || want=("${ALL_SERVICES[@]}")
    for s in "${want[@]}"; do
        case "$s" in keystone | glance | moto) ;; *) die "unknown service '$s' (keystone|glance|moto)" ;; esac
    done
    for s in "${ALL_SERVICES[@]}"; do
        if [[ " ${want[*]} " == *" $s "* ]] ||
            { $with_deps && [[ "$s" == keystone && " ${want[*]} " == *" glance "* ]]; }; then
            out+=("$s")
        fi
    done
    echo "${out[@]}"
}

cmd_start() {
    is_installed || die "not installed; run: $0 install"
    local services
    read -r -a services <<<"$(resolve_services --with-deps "$@")"
    local started_at=$SECONDS s
    # Fail fast, before minutes of setup, if a port we need is held by a stranger.
    for s in "${services[@]}"; do
        if ! running_pid "$s" >/dev/null && port_in_use "$(port_of "$s")"; then
            die "port ${HOST}:$(port_of "$s") for ${s} is taken by a process this script did not" \
                "start (stop it, or set VMCAST_${s^^}_PORT)"
        fi
    done
    set_gunicorn_extra_args
    # moto has no dependencies: start it first so it boots while keystone is being set up.
    [[ " ${services[*]} " == *" moto "* ]] && start_moto
    if [[ " ${services[*]} " == *" keystone "* ]]; then
        start_keystone
        wait_ready keystone
    fi
    if [[ " ${services[*]} " == *" glance "* ]]; then
        start_glance
        wait_ready glance
    fi
    [[ " ${services[*]} " == *" moto "* ]] && wait_ready moto
    write_clouds_yaml
    log "ready in $((SECONDS - started_at))s: ${services[*]}"
}

stop_one() {
    local name="$1" pid pf
    pf="$(pid_file "$name")"
    if ! pid="$(running_pid "$name")"; then
        [[ -f "$pf" ]] && log "${name}: stale pid file removed"
        rm -f "$pf"
        return 0
    fi
    # gunicorn treats SIGINT as "quick shutdown" (SIGTERM waits out keep-alive connections,
    # seconds per server); nothing here needs a graceful drain. moto exits on either.
    kill -INT "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "${name}: did not stop on SIGINT within 10s, killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # The service was a session leader (setsid), so its process group holds only its own
    # workers; reap any a killed gunicorn master left behind.
    kill -KILL -- "-${pid}" 2>/dev/null || true
    rm -f "$pf"
    log "stopped ${name} (pid ${pid})"
}

cmd_stop() {
    local services s
    read -r -a services <<<"$(resolve_services "$@")"
    # In parallel: each server takes ~2 s to exit, and none needs another to shut down.
    for s in "${services[@]}"; do
        stop_one "$s" &
    done
    wait
}

cmd_status() {
    local services s pid rc=0
    read -r -a services <<<"$(resolve_services "$@")"
    # The exit status reports only whether every named service answers, so callers (the pytest
    # fixtures) can use it as a readiness probe; "installed" is information.
    if is_installed; then echo "installed: ${VENV}"; else echo "installed: no"; fi
    for s in "${services[@]}"; do
        if pid="$(running_pid "$s")"; then
            if answers "$(url_of "$s")"; then
                echo "${s}: running, pid ${pid}, $(url_of "$s") answers"
            else
                echo "${s}: pid ${pid} alive but $(url_of "$s") does not answer"; rc=3
            fi
        elif answers "$(url_of "$s")"; then
            echo "${s}: answers at $(url_of "$s"), but was not started from ${SERVICES_DIR}"
        else
            echo "${s}: stopped"; rc=3
        fi
    done
    return "$rc"
}

write_clouds_yaml() {
    mkdir -p "$SERVICES_DIR"
    cat >"${CLOUDS_YAML}.tmp" <<EOF
# Generated by tests/services/clouds.sh
clouds:
  vmcast-test:
    auth:
      auth_url: ${KEYSTONE_URL}/v3
      username: admin
      password: ${ADMIN_PASSWORD}
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: ${REGION}
    interface: public
    identity_api_version: 3
EOF
    mv "${CLOUDS_YAML}.tmp" "$CLOUDS_YAML"
}

cmd_env() {
    write_clouds_yaml
    cat <<EOF
export OS_AUTH_URL=${KEYSTONE_URL}/v3
export OS_USERNAME=admin
export OS_PASSWORD=${ADMIN_PASSWORD}
export OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_NAME=Default
export OS_PROJECT_DOMAIN_NAME=Default
export OS_REGION_NAME=${REGION}
export OS_IDENTITY_API_VERSION=3
export OS_INTERFACE=public
export OS_CLIENT_CONFIG_FILE=${CLOUDS_YAML}
export AWS_ENDPOINT_URL=${MOTO_URL}
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
EOF
}

usage() {
    cat >&2 <<EOF
usage: $0 install|start|stop|status|env [keystone|glance|moto ...]
  install  create ${VENV} with keystone, glance, gunicorn, moto[server]
  start    start the services on ${HOST} (keystone :${KEYSTONE_PORT}, glance :${GLANCE_PORT},
           moto :${MOTO_PORT}) and wait until they answer
  stop     stop the services this script started (by pid file)
  status   show what runs; exit 0 only if every named service answers
  env      print export lines for openstacksdk and boto3 (eval "\$($0 env)")
EOF
    exit 2
}

# Serialises install/start/stop between concurrent callers (two pytest sessions, a developer's
# shell), so a service is never spawned twice.
take_lock() {
    mkdir -p "$SERVICES_DIR"
    exec 9>"${SERVICES_DIR}/.clouds.lock"
    if command -v flock >/dev/null; then
        flock -w 900 9 || die "timed out waiting for ${SERVICES_DIR}/.clouds.lock"
    fi
}

main() {
    (($#)) || usage
    local cmd="$1"; shift
    case "$cmd" in install | start | stop) take_lock ;; esac
    case "$cmd" in
        install) cmd_install ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        env) cmd_env ;;
        *) usage ;;
    esac
}

main "$@"
