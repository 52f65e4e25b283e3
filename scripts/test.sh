#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Installs what the tests need, builds
# every binary the integration tests start, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# One clean build: incremental caches would only take disk (gigabytes) and time.
export CARGO_INCREMENTAL=0

if [ ! -f ../shared/models/grok-1/tokenizer.model ]; then
  echo "note: ../shared/models/grok-1 is missing; the tokenizer tests need it beside the project" >&2
fi

# Debian packages, installed when missing (as root). policy-rc.d (exit 101) keeps a package
# from starting its system service while installing (the tests start their own servers).
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "note: not root, cannot install $*" >&2
    return 0
  fi
  local policy_added=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null 2>&1 \
    || echo "note: could not install $*" >&2
  if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
# etcd-client's build script compiles etcd's protos with protoc.
command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
# The multi-host test puts workers in network namespaces: it needs iproute2 (and root).
command -v ip >/dev/null 2>&1 || apt_install iproute2
# The launch test runs Debian's OpenSSH server (sshd) inside those namespaces as the remote hosts.
[ -x /usr/sbin/sshd ] || apt_install openssh-server
# The membership tests start their own etcd (Debian's etcd-server, not started by the package).
[ -x /usr/bin/etcd ] || apt_install etcd-server

# The HTTP API test drives the official `openai` Python client.
python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet openai
# The reflection test uses grpcio's own reflection client (v1alpha).
python3 -c 'import grpc_reflection' 2>/dev/null || python3 -m pip install --quiet grpcio grpcio-reflection
# The deploy/ tests parse the Kubernetes manifests with PyYAML.
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
# Structured output's test validates what the server generates against its JSON schema.
python3 -c 'import jsonschema' 2>/dev/null || python3 -m pip install --quiet jsonschema
# The ckpt-0 tests write official-format pickles with numpy and ml_dtypes (bfloat16).
python3 -c 'import numpy, ml_dtypes' 2>/dev/null || python3 -m pip install --quiet numpy ml_dtypes

cargo build --workspace --bins --features grok-worker/cuda,grok-tools/cuda --locked
cargo build --workspace --bins --locked
cargo test --workspace --locked
