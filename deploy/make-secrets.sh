#!/bin/sh
# Redis' passwords, one per ACL user (serving.wire.connection.REDIS_USERS and admin), each 32 random bytes in
# hex: into .env for docker compose, and into deploy/k8s/base/redis-passwords.env for the
# Kubernetes base's Secret. A password already there is kept; neither file is committed.
set -eu
cd "$(dirname "$0")/.."
umask 077
for file in .env deploy/k8s/base/redis-passwords.env; do
    for user in WEB MODEL KEDA ADMIN; do
        if ! grep -qs "^REDIS_${user}_PASSWORD=" "$file"; then
            echo "REDIS_${user}_PASSWORD=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >> "$file"
        fi
    done
    echo "Redis passwords in $file"
done
