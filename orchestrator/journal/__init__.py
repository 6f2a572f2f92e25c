"""The journal: what the controller did to each unit, durably, in SQLite on the controller (or in PostgreSQL,
shared by several controllers).

Every remote change goes through a **change record**. The caller writes the intent (with the exact prior state,
`before`) and the journal commits it to disk (WAL, `synchronous=FULL`) *before* the caller touches the unit;
after each step the caller marks the record:

    intent -> applied -> verified -> kept            (the evidence says it helps)
                 |           |          |
                 +-----------+----------+--> rolled_back | rollback_failed
    intent -> failed | rolled_back                   (never applied, or found untouched when reconciling)
    applied | verified -> failed                     (could not apply or verify it; the caller then undoes it:
                                                       failed -> rolled_back | rollback_failed)
    rollback_failed -> rolled_back | rollback_failed  (a later rollback attempt)

Any other transition raises `InvalidTransition` (e.g. kept -> applied). A controller killed in the middle of a
change (SIGKILL, power loss) leaves records in intent/applied/verified: `incomplete(unit)` returns them, and
the next run must reconcile them (finish or undo, from `before`) before it may record new intents for that
unit (`record_intent` refuses otherwise, with `UnreconciledError`).

Locks: one row per unit under a UNIQUE constraint, taken inside `BEGIN IMMEDIATE`, so two controllers racing
for one unit cannot both win. A lock that looks stale (its owner process is gone) is never taken silently:
the caller must name its id (`force_unlock=LOCK_ID`, the CLI's `--force-unlock LOCK_ID`).

Events: a `Journal` is an `EventSink`; every event it receives is stored in the `events` table, and the
journal's own operations (runs, change transitions, unit states, locks) add rows in the same transaction as
the change they describe, so `events_for(unit)` tells the whole story.

Secrets: the journal stores what it is given. Callers must not put secrets (SSH keys, passwords, sudo
passwords, command stdin) in event data, `before`/`desired`/`after` or `decision`. As a safety net, event
data keys that name secrets (stdin, password, passphrase, secret, token, private_key, ...) and values that
look like PEM private keys are replaced by "<redacted>", and raw bytes are never stored.

Several processes may use one journal file at once: each `Journal` opens its own connection, every write is
one `BEGIN IMMEDIATE` transaction, and `busy_timeout` makes writers wait for each other. One `Journal` may be
shared between threads (calls are serialised); after `fork()` the child opens its own connection.

PostgreSQL: `Journal("postgresql://user:password@host:port/db")` (or `open_journal(...)`; `postgres://` works
too) keeps the journal in a PostgreSQL database, through psycopg 3, so controllers on several machines can share
it. The semantics are SQLite's: every write is one transaction (READ COMMITTED, which takes a fresh snapshot per
statement), and writers are serialised by a transaction-scoped advisory lock,
`SELECT pg_advisory_xact_lock(PG_ADVISORY_LOCK_KEY)`, taken first in every write transaction: the stand-in for
SQLite's BEGIN IMMEDIATE, so the locks, the transition checks and the unreconciled-changes refusal hold exactly
as with SQLite (a writer sees every write committed before it got the lock). Migrations run under the same lock,
so two processes opening a new database cannot both migrate. `busy_timeout_s` becomes `lock_timeout`. The
rollout claim path alone (`claim_unit`, `finish_unit`) does not take that lock: see `claim_unit`. A connection
is never used across `fork()` (the child opens its own, as with SQLite). The URL's password never appears in a
message, a `repr` or an event: `journal.path` is the URL with `user:***@` (`redact_url` is the one
redaction function; a URL libpq would misread, e.g. an unencoded "@" or "/" in the password, is refused by
`check_db_url` before libpq sees it, since libpq's own errors would quote parts of the password).

Damage: a journal file that is empty, not SQLite, or has bad pages raises `JournalDamaged` (naming the file
and how to recover it), in every mode; it is never overwritten nor started afresh. Read-only commands open
the journal with `read_only=True` (see `_SQLiteDB`): they work in a read-only state directory.

Rollouts (schema version 2): a rollout is a row in `rollouts` (profile, inventory, policy, status running /
pausing / paused / halted / done) with one row per unit in `rollout_units`, grouped in waves (0 = the canary,
then the batches) and ordered by `position`. Controllers claim units (`claim_unit`), one transaction per claim,
and report each one (`finish_unit`); a claim whose controller died on this host is put back by
`reclaim_dead_claims`. Every rollout write stores an event (`rollout.*`) in the same transaction.
"""
