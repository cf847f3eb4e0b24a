"""Chaos: payment tasks through workers that are killed with ``kill -9`` and a Redis that is restarted.

    .venv/bin/python bench/chaos.py [--quick] [--tasks N] [--seed S] [--systems safetynet,celery]
                                    [--broker redis|rabbitmq] [--keep]

N payment-like tasks (5000; 500 with ``--quick``) each charge an order at a gateway stub and
write a ledger row. The same workload runs twice, on the same set-up: once as a safetynet task
(an idempotency key, given to the gateway as its Idempotency-Key), once as plain Celery written
the way the classic tutorials write it (``autoretry_for`` network errors, ``retry_backoff``,
early acks). See ``_chaos_tasks.py``.

The set-up, alike for both systems:

- a private ``redis-server`` on a free port, append-only file fsynced on every write, so that
  a restart loses no acknowledged message; the broker's visibility timeout is short (10 s), so
  messages a killed worker held come back in seconds rather than the default hour;
- a fresh PostgreSQL database (``safetynet_chaos_<pid>``), migrated, with the ledger table,
  dropped at the end (``--keep`` keeps it and the worker logs);
- the gateway stub in this process: a seeded 5 % of charges are made and then the reply stalls
  (2 s) past the client's timeout (1 s): the client sees a timeout although it was charged.
  With a key it has seen, the gateway returns that charge and charges nothing;
- two prefork workers (4 children each); every 2–5 s (seeded) one of them, main process and
  children, gets ``kill -9`` and is started again (a worker that exits by itself is started
  again too, as a process supervisor would); Redis is killed (SIGKILL) and started again
  once, when half of the orders are done. The chaos stops when 90 % of the orders are
  accounted for (or after ``--chaos-seconds``), then the run drains.

``--broker rabbitmq`` runs the same on RabbitMQ (queues of the run's own on the server at
``--amqp-url``); the private Redis then only keeps safetynet's shared counters, and is still
restarted once. The Redis transport of kombu takes a message off the list (BRPOP) and records
it as unacknowledged in a second command: a ``kill -9`` between the two (or a reply lost when
Redis restarts) loses the message whatever the task does, and late acks cannot bring it back.
safetynet keeps each idempotent task's message (a ``sent`` row) when it is sent, and the relay of
every worker sends again one that no run claimed within ``LOST_MESSAGE_SECONDS`` (60 s here, above
the longest wait in this run's queue; 900 s by default), or at once once the run holding its key
died (the orphan sweep); the claim makes a copy that was only slow harmless. Plain
Celery has nothing of the kind. RabbitMQ keeps an unacknowledged message on the server and puts
it back when the consumer's connection dies, so late acks are enough there.

An order is accounted for when it has a ledger row (succeeded) or a final-failure record
(dead: safetynet's dead letters; for plain Celery, rows its ``task_failure`` receiver wrote).
The drain waits until all are, or until nothing moved for ``--stall-seconds``; what is left is
lost. ``drain_s`` is the time from the first send to the last order accounted for (or to the
give-up). Then the run waits for the broker to be empty (late duplicates get counted too).

The last two lines::

    system=safetynet sent=… succeeded=… dead=… lost=… duplicate_ledger=… duplicate_charges=… drain_s=…
    system=celery sent=… succeeded=… dead=… lost=… duplicate_ledger=… duplicate_charges=… drain_s=…

duplicate_ledger = ledger rows − orders with a row; duplicate_charges = Σ over orders of
(charges the gateway made − 1). The exit status is 1 when safetynet lost an order or did
anything twice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _chaos_gateway import Gateway  # noqa: E402
from _chaos_processes import Chaos, RabbitBroker, RedisBroker, RedisServer, Worker  # noqa: E402

SYSTEMS = ("safetynet", "celery")
WORKERS = 2
CONCURRENCY = 4
LEASE_SECONDS = 5  # the safetynet task's idempotency_lease
RESTORE_INTERVAL = 2  # the broker's sweep for messages past their visibility timeout
STARTUP_TIMEOUT = 90.0


@dataclass
class Run:
    """One system's run: its timings and chaos, and what became of its orders."""

    system: str
    drained: bool = False
    drain_s: float = 0.0
    chaos_s: float = 0.0
    settle_s: float = 0.0
    kills: int = 0
    exits: list[str] = field(default_factory=list)
    redis_down_s: float = 0.0
    redis_restarted_at: int = 0
    outcome: object = None
    gateway: dict = field(default_factory=dict)
    unrecorded_charges: int = 0
    lost_in_transport: int | None = None
    log_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def _publish(task, order_id: int, queue: str) -> str:
    """Send one order, return its task id; when the broker does not answer, keep trying for a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return task.apply_async(kwargs={"order_id": order_id, "amount": 100 + order_id % 900}, queue=queue).id
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _trace(order_id: int, task_id: str, log_dir: Path, broker, queue: str) -> str:
    """Where a lost order's task was last seen: the worker log lines naming its id, the broker."""
    seen = []
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if task_id in line:
                seen.append(f"{log.stem}: {line[:160]}")
    in_broker = broker.copies(queue, task_id)
    where = "; ".join(seen[-4:]) if seen else "in no worker log (never received)"
    return f"lost order {order_id}, task {task_id}: {len(seen)} log lines, {in_broker} copies in the broker; {where}"


def run_system(system: str, args: argparse.Namespace, broker, redis_server: RedisServer, work_dir: Path) -> Run:
    import _chaos_accounts as accounts
    import _chaos_tasks as tasks

    run = Run(system, log_dir=work_dir / system)
    run.log_dir.mkdir()
    order_ids = range(1, args.tasks + 1)
    total = len(order_ids)
    queue = f"chaos.{args.run_id}.{system}"
    task = tasks.safetynet_charge if system == "safetynet" else tasks.celery_charge
    broker.reset(queue)
    gateway = Gateway(seed=args.seed, fault_rate=args.fault_rate, stall_seconds=args.stall).start()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "DJANGO_SETTINGS_MODULE": "_chaos_settings",
        "SAFETYNET_CHAOS_GATEWAY": gateway.url,
    }
    workers = [Worker(f"{system}-{number}", queue, env, run.log_dir, CONCURRENCY) for number in range(1, WORKERS + 1)]
    killer = Chaos(workers, seed=args.seed, low=args.kill_min, high=args.kill_max)
    task_ids: dict[int, str] = {}
    conn = accounts.Books()
    postgres_started = conn.postgres_started()
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(STARTUP_TIMEOUT)
        print(f"[{system}] workers ready; sending {total} orders to {queue}", flush=True)
        began = time.monotonic()
        killer.start()
        for order_id in order_ids:
            task_ids[order_id] = _publish(task, order_id, queue)
        print(f"[{system}] sent {total} in {time.monotonic() - began:.1f}s", flush=True)

        chaos, restarted = True, False
        done = last_done = 0
        last_progress = last_report = time.monotonic()
        stall_limit = args.stall_seconds
        if system == "safetynet":  # what its relay sends again is not lost: --quick waits for it too
            stall_limit = max(stall_limit, args.relay_wait)
        while True:
            time.sleep(0.5)
            done = conn.accounted(system)
            now = time.monotonic()
            if done > last_done:
                last_done, last_progress = done, now
            if done >= total:
                run.drained, run.drain_s = True, now - began
                break
            if chaos:
                if not restarted and (done >= total * 0.5 or now - began >= args.chaos_seconds / 2):
                    run.redis_restarted_at = done
                    run.redis_down_s = redis_server.restart(args.redis_down)
                    restarted = True
                    print(f"[{system}] redis restarted at {done}/{total} (away {run.redis_down_s:.1f}s)", flush=True)
                if done >= total * args.chaos_until or now - began >= args.chaos_seconds:
                    killer.stop_killing()
                    chaos, run.chaos_s, last_progress = False, now - began, now
                    print(f"[{system}] chaos over after {run.chaos_s:.1f}s at {done}/{total}: "
                          f"{killer.kills} kills; draining", flush=True)
            elif now - last_progress > stall_limit or now - began > args.drain_cap:
                run.drain_s = now - began
                run.notes.append(f"gave up draining: {total - done} orders unaccounted for, no progress for "
                                 f"{now - last_progress:.0f}s")
                break
            if now - last_report >= 10:
                last_report = now
                print(f"[{system}] {done}/{total} accounted for after {now - began:.0f}s, "
                      f"{killer.kills} kills", flush=True)
        if chaos:
            killer.stop_killing()
            run.chaos_s = time.monotonic() - began
        run.kills = killer.kills
        if killer.errors:
            run.notes.append("killer errors: " + "; ".join(killer.errors[:5]))
        if not restarted:
            run.notes.append("redis was not restarted (the run finished first)")

        # Late duplicates: wait until the broker holds nothing more for this system.
        settle_began = time.monotonic()
        quiet = 0
        while time.monotonic() - settle_began < args.stall_seconds and quiet < 3:
            quiet = quiet + 1 if broker.backlog(queue) == 0 else 0
            time.sleep(1.0)
        run.settle_s = time.monotonic() - settle_began
        if quiet < 3:
            run.notes.append(f"the broker still held {broker.backlog(queue)} messages at the end")
    finally:
        killer.stop()
        for worker in workers:
            worker.stop()
        gateway.stop()
    run.exits = killer.exits
    if conn.postgres_started() != postgres_started:
        run.notes.append("PostgreSQL was restarted during the run by something else (another test suite?): "
                         "these figures include a database outage")
    run.gateway = gateway.figures()
    run.outcome = accounts.outcome(conn.conn, system, order_ids)
    lost_ids = {task_ids[order_id] for order_id in run.outcome.lost_orders}
    if args.broker == "redis":
        run.lost_in_transport = len(broker.lost_in_transport(queue, lost_ids)) if lost_ids else 0
    if system == "safetynet":
        for order_id, reason, detail, error, task_id, worker in run.outcome.dead_yet_succeeded[:10]:
            run.notes.append(f"order {order_id} was dead-lettered ({reason}: {detail[:120]!r}; {error[:120]}; "
                             f"task {task_id} on {worker}) and yet succeeded")
        for order_id in sorted(run.outcome.lost_orders)[:10]:
            run.notes.append(_trace(order_id, task_ids[order_id], run.log_dir, broker, queue))
    broker.cleanup(queue)
    run.unrecorded_charges = accounts.unrecorded_charges(conn.conn, system, gateway.charged_orders())
    conn.close()
    return run


def _row(label: str, values: list[object]) -> str:
    return f"{label:<34}" + "".join(f"{value!s:>22}" for value in values)


def report(runs: list[Run], args: argparse.Namespace) -> None:
    import _chaos_tasks as tasks

    print()
    print(f"{args.tasks} orders per system; seed {args.seed}; gateway: {args.fault_rate:.0%} of charges made, then "
          f"the reply stalls {args.stall:g}s past the client's {tasks.GATEWAY_TIMEOUT:g}s timeout")
    if args.broker == "redis":
        print(f"broker: private redis, appendfsync always, visibility_timeout {args.visibility_timeout:g}s "
              f"(both systems); redis SIGKILLed and restarted once")
    else:
        print("broker: rabbitmq (queues of the run's own); the private redis (safetynet's shared counters) "
              "SIGKILLed and restarted once")
    print(f"{WORKERS} prefork workers x {CONCURRENCY} per system; kill -9 of a whole worker (main process and "
          f"children) every {args.kill_min:g}-{args.kill_max:g}s, seeded")
    print()
    print(_row("", [run.system for run in runs]))
    lines = [
        ("sent", lambda r: r.outcome.sent),
        ("succeeded (orders with a ledger row)", lambda r: r.outcome.succeeded),
        ("dead (recorded final failures)", lambda r: r.outcome.dead),
        ("  by reason", lambda r: ", ".join(f"{k}:{v}" for k, v in sorted(r.outcome.dead_by_reason.items())) or "-"),
        ("  dead and yet succeeded", lambda r: r.outcome.dead_and_succeeded),
        ("lost (neither)", lambda r: r.outcome.lost),
        ("  of which by the Redis transport", lambda r: "-" if r.lost_in_transport is None else r.lost_in_transport),
        ("ledger rows", lambda r: r.outcome.ledger_rows),
        ("duplicate ledger rows", lambda r: r.outcome.duplicate_ledger),
        ("  orders with duplicate rows", lambda r: r.outcome.orders_with_duplicate_rows),
        ("gateway requests", lambda r: r.gateway["requests"]),
        ("gateway charges", lambda r: r.gateway["charges"]),
        ("  charged then timed out", lambda r: r.gateway["stalls"]),
        ("  replayed by idempotency key", lambda r: r.gateway["replays"]),
        ("duplicate gateway charges", lambda r: r.gateway["duplicate_charges"]),
        ("charged, no ledger row", lambda r: r.unrecorded_charges),
        ("workers kill -9'd", lambda r: r.kills),
        ("workers that exited by themselves", lambda r: len(r.exits)),
        ("redis restarted at (accounted)", lambda r: f"{r.redis_restarted_at} ({r.redis_down_s:.1f}s away)"),
        ("chaos lasted (s)", lambda r: f"{r.chaos_s:.1f}"),
        ("drain_s (first send -> all done)", lambda r: f"{r.drain_s:.1f}" + ("" if r.drained else " (gave up)")),
        ("broker settled after (s)", lambda r: f"{r.settle_s:.1f}"),
    ]
    for label, value in lines:
        print(_row(label, [value(run) for run in runs]))
    if any(run.lost_in_transport for run in runs):
        print("lost by the Redis transport: a message popped off the queue (BRPOP) by a worker that was killed before "
              "it recorded the message as unacknowledged (kombu does that in a second command); read from redis' "
              "append-only file. No task code runs in that window; --broker rabbitmq has none.")
    for run in runs:
        if run.system == "safetynet" and run.outcome.claims:
            print("safetynet idempotency claims at the end: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(run.outcome.claims.items()))
                  + f"; sent again by the relay: {run.outcome.resent_messages} message(s) of "
                    f"{run.outcome.resent_claims} task(s)")
        if run.exits:
            print(f"note ({run.system}): restarted after exiting by themselves: {', '.join(run.exits[:6])}")
        for note in run.notes:
            print(f"note ({run.system}): {note}")
    print()
    for run in runs:
        o = run.outcome
        print(f"system={run.system} sent={o.sent} succeeded={o.succeeded} dead={o.dead} lost={o.lost} "
              f"duplicate_ledger={o.duplicate_ledger} duplicate_charges={run.gateway['duplicate_charges']} "
              f"drain_s={run.drain_s:.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run: 500 orders per system")
    parser.add_argument("--tasks", type=int, help="orders per system (default 5000, 500 with --quick)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the gateway's faults and of the kills")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems to run (default: both)")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="charges made and then timed out (0.05)")
    parser.add_argument("--stall", type=float, default=2.0, help="seconds the gateway stalls such a reply (2)")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                        help="redis (default): the private Redis is the broker too; rabbitmq: RabbitMQ at --amqp-url"
                             " is the broker, and the private Redis keeps safetynet's shared counters")
    parser.add_argument("--amqp-url", default=os.environ.get("SAFETYNET_CHAOS_AMQP", "amqp://guest:guest@127.0.0.1:5672//"),
                        help="RabbitMQ for --broker rabbitmq (queues of the run's own, deleted at the end)")
    parser.add_argument("--visibility-timeout", type=float, default=10.0,
                        help="the Redis broker's visibility timeout (10)")
    parser.add_argument("--kill-min", type=float, default=2.0, help="shortest time between kills (2)")
    parser.add_argument("--kill-max", type=float, default=5.0, help="longest time between kills (5)")
    parser.add_argument("--redis-down", type=float, default=1.0, help="seconds Redis stays down (1)")
    parser.add_argument("--chaos-until", type=float, default=0.9,
                        help="stop the chaos when this share of the orders is accounted for (0.9)")
    parser.add_argument("--chaos-seconds", type=float, help="stop the chaos after this long anyway (240; 60 quick)")
    parser.add_argument("--stall-seconds", type=float,
                        help="give up draining after this long without progress (default: the longer of "
                             "3 x visibility timeout + lease + sweep interval = 37 and safetynet's "
                             "LOST_MESSAGE_SECONDS + its sweep interval + lease = 80; with --quick at most 25, but "
                             "for safetynet at least its LOST_MESSAGE_SECONDS (30 there) + sweep + lease = 43)")
    parser.add_argument("--drain-cap", type=float, help="give up draining after this long in all (chaos + 300)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the worker logs")
    args = parser.parse_args(argv)
    args.run_id = uuid.uuid4().hex[:8]
    if args.tasks is None:
        args.tasks = 500 if args.quick else 5000
    if args.chaos_seconds is None:
        args.chaos_seconds = 60.0 if args.quick else 240.0
    if args.quick:  # 500 orders drain in ~15 s: a message the transport lost comes back within the quick run
        os.environ.setdefault("SAFETYNET_CHAOS_LOST_MESSAGE", "30")
    lost_message = float(os.environ.get("SAFETYNET_CHAOS_LOST_MESSAGE") or 60)
    #: safetynet's drain waits for its relay: a lost message is sent again this long after it was (its sweep, its
    #: lease); plain Celery's drain gives up sooner under --quick (nothing brings a lost message back there).
    args.relay_seconds = lost_message + min(60.0, max(1.0, lost_message / 4)) + LEASE_SECONDS
    args.relay_wait = args.relay_seconds if args.stall_seconds is None else 0.0
    if args.stall_seconds is None:
        args.stall_seconds = max(3 * args.visibility_timeout + LEASE_SECONDS + RESTORE_INTERVAL, args.relay_seconds)
        if args.quick:  # under a minute when nothing is lost: what is left after this is counted lost
            args.stall_seconds = min(args.stall_seconds, 25.0)
    if args.drain_cap is None:
        args.drain_cap = args.chaos_seconds + 300.0
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if args.tasks < 1 or not systems or any(name not in SYSTEMS for name in systems):
        parser.error(f"--tasks must be >= 1 and --systems a list of {', '.join(SYSTEMS)}")

    def terminate(signum, frame):  # run the clean-up below on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    work_dir = Path(tempfile.mkdtemp(prefix="safetynet-chaos-"))
    redis_server = RedisServer(work_dir)
    keep_logs = args.keep
    created = False
    runs: list[Run] = []
    try:
        redis_server.start()
        if args.broker == "redis":
            broker = RedisBroker(redis_server)
        else:
            broker = RabbitBroker(args.amqp_url)
            os.environ["SAFETYNET_CHAOS_REDIS"] = redis_server.url
        os.environ["SAFETYNET_CHAOS_BROKER"] = broker.url
        os.environ["SAFETYNET_CHAOS_VISIBILITY"] = str(args.visibility_timeout)
        os.environ["SAFETYNET_CHAOS_SPOOL"] = str(work_dir / "spool")
        # A database of the run's own: two runs at once must not drop each other's.
        os.environ.setdefault("SAFETYNET_CHAOS_DB", f"safetynet_chaos_{os.getpid()}")
        import celery
        import django

        import _chaos_accounts as accounts
        import safetynet

        name = accounts.create_database()
        created = True
        print(f"safetynet {safetynet.__version__}, celery {celery.__version__}, django {django.__version__}; "
              f"broker {args.broker}; redis {redis_server.url} (private, dir {work_dir}); database {name}", flush=True)
        for system in systems:
            runs.append(run_system(system, args, broker, redis_server, work_dir))
        report(runs, args)
        failed = [run for run in runs if run.system == "safetynet" and (
            run.outcome.lost or run.outcome.duplicate_ledger or run.gateway["duplicate_charges"])]
        if failed:
            keep_logs = True
        return 1 if failed else 0
    finally:
        redis_server.kill()
        if created and not args.keep:
            try:
                accounts.drop_database()
            except Exception as error:  # noqa: BLE001
                print(f"could not drop the database: {error!r}", file=sys.stderr)
        if keep_logs:
            print(f"logs kept in {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
