#!/usr/bin/env bash
# `make docker-e2e`: build the image, bring the compose CPU service up, call it from the host, tear it down.
#
# Uses a Docker engine that already answers, or starts one (installing Debian's docker.io when apt-get is
# there and we are root) and stops only the engine it started. Leaves no container running; keeps the image.
#
# Settings (environment):
#   LORASWAP_HOST_PORT         host port the service is published on (127.0.0.1 only); default 18000 here,
#                              so a `make serve` or a real `docker compose up` on 8000 is not in the way
#   LORASWAP_E2E_BASE          official (default): the Dockerfile's python:3.11 slim base, pulled as usual;
#                              standin: a Debian bookworm base made here with debootstrap + docker import,
#                              for machines that reach Debian's mirror but not Docker Hub (this project's CI)
#   LORASWAP_E2E_WHEELS        a local directory of wheels (e.g. a CPU torch wheel) pip may use in the build;
#                              served to the build on 127.0.0.1, so torch is not a multi-GB download
#   LORASWAP_E2E_PIP_INDEX_URL pip's index inside the build (default: pip's own, PyPI)
#   LORASWAP_E2E_WAIT_S        how long the service may take to become healthy, in seconds (default 300)
set -euo pipefail
shopt -s lastpipe  # `call ... | expect_json ...`: the check (and its count) runs in this shell
cd "$(dirname "$0")/.."

IMAGE=loraswap:0.1.0                      # docker-compose.yml's `image:`; a test keeps them equal
PROJECT=loraswap-e2e                      # own compose project: a user's running stack is not touched
SERVICE=loraswap-cpu
STANDIN_TAG=loraswap-standin-base:bookworm-py311
STANDIN_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/loraswap/standin-base-bookworm-py311.tar
DEBIAN_MIRROR=${LORASWAP_E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS_PORT=${LORASWAP_E2E_WHEELS_PORT:-18001}  # fixed, so the build's cache key stays the same
export LORASWAP_HOST_PORT=${LORASWAP_HOST_PORT:-18000}
BASE_MODE=${LORASWAP_E2E_BASE:-official}
WAIT_S=${LORASWAP_E2E_WAIT_S:-300}

# Logs of the last run stay here (dockerd, debootstrap, build, compose), for a look after a failure.
WORK=${LORASWAP_E2E_LOG_DIR:-${TMPDIR:-/tmp}/loraswap-docker-e2e}
rm -rf "$WORK" && mkdir -p "$WORK"
STARTED_DOCKERD_PID=""
WHEELS_PID=""
COMPOSE=()
T0=$(date +%s)

CHECKS_PASSED=0

say() { printf '[docker-e2e %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf '[docker-e2e] FAILED: %s\n' "$*" >&2; exit 1; }
passed() { CHECKS_PASSED=$((CHECKS_PASSED + 1)); say "ok: $*"; }

cleanup() {
  local rc=$?
  set +e
  if ((${#COMPOSE[@]})); then
    if ((rc != 0)); then
      say "logs of the service (last 40 lines):"
      "${COMPOSE[@]}" logs --no-color --tail 40 "$SERVICE" 2>&1 | cut -c1-2000 | sed 's/^/    /'
    fi
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 30 >"$WORK/down.log" 2>&1 \
      || { cat "$WORK/down.log" >&2; rc=1; }
    if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]; then
      echo "[docker-e2e] FAILED: a container of $PROJECT is left after compose down" >&2
      rc=1
    elif ((rc == 0)); then
      passed "compose down left no container of $PROJECT"
    fi
    if ((rc == 0)); then
      docker image inspect "$IMAGE" >/dev/null 2>&1 && passed "the image $IMAGE is kept" \
        || { echo "[docker-e2e] FAILED: the image $IMAGE is gone" >&2; rc=1; }
    fi
  fi
  stop_wheels
  if [ -n "$STARTED_DOCKERD_PID" ]; then
    say "stopping the Docker engine this run started (pid $STARTED_DOCKERD_PID)"
    kill "$STARTED_DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null && echo "[docker-e2e] dockerd $STARTED_DOCKERD_PID did not stop" >&2
  fi
  rm -rf "$WORK/rootfs"
  if ((rc == 0)); then
    echo "docker-e2e: $CHECKS_PASSED passed, 0 failed"
  else
    echo "[docker-e2e] FAILED (exit $rc); logs in $WORK" >&2
    echo "docker-e2e: $CHECKS_PASSED passed, 1 failed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted (signal)"; exit 130' INT
trap 'say "terminated (SIGTERM)"; exit 143' TERM

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  say "installing $* (apt-get)"
  apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; return 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; return 1; }
}

ensure_engine() {
  command -v docker >/dev/null 2>&1 || apt_install docker.io iptables || die "no docker CLI, and it cannot be installed here"
  if docker info >/dev/null 2>&1; then
    say "using the Docker engine that already answers ($(docker info --format '{{.ServerVersion}}'))"
    return
  fi
  [ -n "${DOCKER_HOST:-}" ] && die "DOCKER_HOST=$DOCKER_HOST does not answer; not starting an engine in its place"
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io iptables || die "no Docker engine answers, and docker.io cannot be installed"
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting dockerd needs root"
  command -v iptables >/dev/null 2>&1 || apt_install iptables || die "dockerd needs iptables"
  say "starting dockerd (log: $WORK/dockerd.log)"
  dockerd --host unix:///var/run/docker.sock >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD_PID=$!
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && { say "dockerd is up ($(docker info --format '{{.ServerVersion}}'))"; return; }
    kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  tail -30 "$WORK/dockerd.log" >&2
  kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || STARTED_DOCKERD_PID=""
  die "the Docker engine did not start (dockerd's log above); this check cannot run on this machine"
}

ensure_compose() {
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  else
    command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose || die "neither 'docker compose' nor docker-compose is available"
    COMPOSE=(docker-compose)
  fi
  say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
  COMPOSE+=(-p "$PROJECT" -f docker-compose.yml --profile cpu)
}

# A Debian bookworm root filesystem with Python 3.11, made from Debian's packages, trusting the host's
# CA bundle (pip in the build then reaches PyPI through whatever TLS the host's network needs).
ensure_standin_base() {
  if docker image inspect "$STANDIN_TAG" >/dev/null 2>&1; then
    say "stand-in base $STANDIN_TAG: in the engine already"
    return
  fi
  if [ ! -s "$STANDIN_CACHE" ]; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap || die "the stand-in base needs debootstrap"
    local rootfs="$WORK/rootfs"
    say "making the stand-in base with debootstrap (bookworm, python3.11)"
    debootstrap --variant=minbase --include=python3.11,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
      cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
      chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the stand-in base"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/debootstrap
    mkdir -p "$(dirname "$STANDIN_CACHE")"
    tar --numeric-owner -C "$rootfs" -cf "$STANDIN_CACHE.part" . && mv "$STANDIN_CACHE.part" "$STANDIN_CACHE"
    rm -rf "$rootfs"
  fi
  say "importing the stand-in base from $STANDIN_CACHE"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    "$STANDIN_CACHE" "$STANDIN_TAG" >/dev/null
}

stop_wheels() {
  if [ -n "$WHEELS_PID" ]; then
    kill "$WHEELS_PID" 2>/dev/null || true
    wait "$WHEELS_PID" 2>/dev/null || true  # it ends by our SIGTERM: not a failure
    WHEELS_PID=""
  fi
}

serve_wheels() {
  local dir=$1
  [ -d "$dir" ] || die "LORASWAP_E2E_WHEELS=$dir is not a directory"
  if (exec 3<>"/dev/tcp/127.0.0.1/$WHEELS_PORT") 2>/dev/null; then
    die "port $WHEELS_PORT (for serving $dir to the build) is taken; set LORASWAP_E2E_WHEELS_PORT"
  fi
  python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$WHEELS_PORT" >"$WORK/wheels.log" 2>&1 &
  WHEELS_PID=$!
  for _ in $(seq 1 40); do
    curl -fsS "http://127.0.0.1:$WHEELS_PORT/" >/dev/null 2>&1 && return
    sleep 0.25
  done
  die "the wheel server for $dir did not start"
}

build_image() {
  local args=(build --tag "$IMAGE")
  case "$BASE_MODE" in
    official) ;;
    standin) ensure_standin_base; args+=(--build-arg "BASE_IMAGE=$STANDIN_TAG") ;;
    *) die "LORASWAP_E2E_BASE must be official or standin, not $BASE_MODE" ;;
  esac
  if [ -n "${LORASWAP_E2E_WHEELS:-}" ]; then
    serve_wheels "$LORASWAP_E2E_WHEELS"
    args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEELS_PORT/")
  fi
  # The build's pip reaches the host's loopback (wheel server) and network as the host does.
  if [ "$BASE_MODE" = standin ] || [ -n "${LORASWAP_E2E_WHEELS:-}" ]; then args+=(--network host); fi
  [ -n "${LORASWAP_E2E_PIP_INDEX_URL:-}" ] && args+=(--build-arg "PIP_INDEX_URL=$LORASWAP_E2E_PIP_INDEX_URL")
  say "docker ${args[*]} ."
  local start=$(date +%s)
  docker "${args[@]}" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; die "docker build failed"; }
  BUILD_S=$(($(date +%s) - start))
  stop_wheels
  local bytes
  bytes=$(docker image inspect --format '{{.Size}}' "$IMAGE")
  # The image this build replaced, now untagged, goes (its layers stay while the new image uses them).
  docker image prune --force --filter "label=org.opencontainers.image.title=loraswap" >/dev/null
  passed "built $IMAGE in ${BUILD_S}s, $(awk -v b="$bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
}

check_image() {
  # Runs as a numeric non-root user, and that user can read every file the image bakes in.
  local user unreadable
  user=$(docker image inspect --format '{{.Config.User}}' "$IMAGE")
  [[ "$user" =~ ^[1-9][0-9]*$ ]] || die "the image's user is '$user', not a numeric non-root uid"
  unreadable=$(docker run --rm --network none --entrypoint find "$IMAGE" /srv/loraswap /opt/venv ! -readable 2>&1 | head -5)
  [ -z "$unreadable" ] || die "files the image's user cannot read: $unreadable"
  passed "the image runs as uid $user and that user can read every file under /srv/loraswap and /opt/venv"
}

compose_up() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$LORASWAP_HOST_PORT") 2>/dev/null; then
    die "port $LORASWAP_HOST_PORT is taken on 127.0.0.1; set LORASWAP_HOST_PORT to a free one"
  fi
  local start=$(date +%s)
  if [ "${COMPOSE[0]}" = docker ]; then
    "${COMPOSE[@]}" up --detach --no-build --wait --wait-timeout "$WAIT_S" "$SERVICE" \
      || die "the service did not become healthy within ${WAIT_S}s"
  else
    # docker-compose 1.x has no --wait: poll the container's healthcheck, which is what --wait does.
    "${COMPOSE[@]}" up --detach --no-build "$SERVICE" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "compose up failed"; }
    local id status=""
    id=$("${COMPOSE[@]}" ps -q "$SERVICE")
    [ -n "$id" ] || die "compose started no container for $SERVICE"
    while (($(date +%s) - start < WAIT_S)); do
      status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
      case "$status" in
        healthy) break ;;
        unhealthy | exited | dead) die "the service is $status" ;;
      esac
      sleep 1
    done
    [ "$status" = healthy ] || die "the service did not become healthy within ${WAIT_S}s (last: $status)"
  fi
  HEALTHY_S=$(($(date +%s) - start))
  passed "compose service $SERVICE healthy after ${HEALTHY_S}s on 127.0.0.1:$LORASWAP_HOST_PORT"
}

# POST or GET from the host; prints the body, fails on any status but the expected one.
call() {
  local expect=$1 method=$2 path=$3 body=${4:-}
  local url="http://127.0.0.1:$LORASWAP_HOST_PORT$path" out="$WORK/body" code
  if [ -n "$body" ]; then
    code=$(curl -sS -o "$out" -w '%{http_code}' -X "$method" -H 'content-type: application/json' --data "$body" "$url")
  else
    code=$(curl -sS -o "$out" -w '%{http_code}' -X "$method" "$url")
  fi
  [ "$code" = "$expect" ] || die "$method $path answered $code, expected $expect: $(head -c 400 "$out")"
  cat "$out"
}

# Reads the JSON body on stdin and asserts a Python expression over it (`b`).
expect_json() {
  python3 -c 'import json, sys
b = json.load(sys.stdin)
assert eval(sys.argv[1]), f"{sys.argv[1]} is false for {b!r:.400}"
print(json.dumps(eval(sys.argv[3]))[:200])' "$@" >"$WORK/checked" || die "$2 did not answer as expected"
  passed "$2 from the host: $(cat "$WORK/checked")"
}

check_api() {
  call 200 GET /readyz | expect_json 'b["ready"] is True and not b["missing"]' /readyz '[c["name"] for c in b["components"]]'
  call 200 POST /nli '{"premise": "A man is playing a guitar on stage.", "hypothesis": "A person is making music."}' \
    | expect_json 'b["label"] in b["scores"] and abs(sum(b["scores"].values()) - 1) < 1e-3' /nli 'b'
  call 200 POST /nli/batch '{"pairs": [
      {"premise": "Two dogs run through a field.", "hypothesis": "Animals are outside."},
      {"premise": "A woman reads a book.", "hypothesis": "Nobody is reading.", "adapter": "snli"},
      {"premise": "The company sold its shares.", "hypothesis": "Shares were sold.", "adapter": "rte"}]}' \
    | expect_json '[r["adapter"] for r in b["results"]] == ["mnli", "snli", "rte"]' /nli/batch '[r["label"] for r in b["results"]]'
  local transaction
  transaction=$(python3 -c 'import json; print(json.dumps(json.load(open("app/static/fraud_samples.json"))["samples"][0]["transaction"]))')
  call 200 POST /fraud "$transaction" \
    | expect_json '0 <= b["fraud_probability"] <= 1 and isinstance(b["is_fraud"], bool)' /fraud 'b'
  call 422 POST /nli '{"premise": ""}' | expect_json 'b["error"]["code"]' '/nli (bad input)' 'b["error"]["code"]'
}

command -v curl >/dev/null 2>&1 || apt_install curl || die "curl is needed"
command -v python3 >/dev/null 2>&1 || die "python3 is needed (to read the JSON answers)"
ensure_engine
ensure_compose
build_image
check_image
compose_up
check_api
say "summary: build ${BUILD_S}s, image $(docker image inspect --format '{{.Size}}' "$IMAGE") bytes, healthy after ${HEALTHY_S}s"
