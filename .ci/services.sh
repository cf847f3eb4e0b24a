#!/usr/bin/env bash
# Start each local service the tests need (PostgreSQL, Redis, RabbitMQ) if it is not answering.
set -u

answers() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && exec 3>&- 3<&-
}

wait_for() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do
    answers "$2" "$3" && return 0
    sleep 0.5
  done
  echo "services: $1 did not come up on $2:$3" >&2
  return 1
}

status=0
if ! answers 127.0.0.1 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_for PostgreSQL 127.0.0.1 5432 60 || status=1
fi
if ! answers 127.0.0.1 6379; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_for Redis 127.0.0.1 6379 30 || status=1
fi
if ! answers 127.0.0.1 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ 127.0.0.1 5672 120 || status=1
fi
exit $status
