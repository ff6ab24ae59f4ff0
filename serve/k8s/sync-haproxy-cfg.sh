#!/bin/sh
# serve/k8s/haproxy.cfg is a byte-for-byte copy of serve/haproxy.cfg, the one source of truth (compose mounts that
# one). kustomize reads files only inside serve/k8s (its load restrictor; a symlink out is refused too), so the
# ConfigMap is generated from this copy. Run this after every change to serve/haproxy.cfg;
# tests/test_k8s.py fails while the two differ.
set -eu
cd "$(dirname "$0")"
cp ../haproxy.cfg haproxy.cfg
echo "serve/k8s/haproxy.cfg <- serve/haproxy.cfg"
