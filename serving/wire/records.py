"""The model rollouts' records in Redis: the wanted model, the accepted versions, refusals."""
import json

from serving.wire.job_format import text_hash
from serving.wire.scripts import Script

HISTORY_LENGTH = 10
REFUSAL_TTL_S = 24 * 3600


def propose_model(redis, keys, spec):
    """Make `spec` the model every worker should serve, under a new rollout number."""
    rollout = redis.incr(keys.model_rollouts)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.model)
    pipe.hset(keys.model, mapping={**spec, "rollout": rollout})
    pipe.execute()
    return rollout


def wanted_model(redis, keys):
    """(spec, rollout number) of the model workers should serve; (None, 0) before any."""
    record = text_hash(redis.hgetall(keys.model))
    if not record:
        return None, 0
    rollout = int(record.pop("rollout", 0))
    return record, rollout


def restore_model(redis, keys, rollout, spec):
    """Take back rollout number `rollout`: propose `spec` (None: forget the wanted model) unless a
    later rollout has begun meanwhile. Returns the new rollout number, or None if one had."""
    def restore(pipe):
        if wanted_model(pipe, keys)[1] != rollout:
            return None
        new = int(pipe.get(keys.model_rollouts) or 0) + 1 if spec is not None else 0
        pipe.multi()
        pipe.delete(keys.model)
        if spec is not None:
            pipe.set(keys.model_rollouts, new)
            pipe.hset(keys.model, mapping={**spec, "rollout": new})
        return new

    return redis.transaction(restore, keys.model, keys.model_rollouts, value_from_callable=True)


def accepted_models(redis, keys):
    """The accepted model specs, oldest first."""
    return [json.loads(item) for item in redis.lrange(keys.model_history, 0, -1)]


def history_entry(spec):
    return json.dumps(spec, sort_keys=True)


def accept_model(redis, keys, spec):
    """Record `spec` as the newest accepted model (kept: the last HISTORY_LENGTH)."""
    pipe = redis.pipeline(transaction=True)
    pipe.rpush(keys.model_history, history_entry(spec))
    pipe.ltrim(keys.model_history, -HISTORY_LENGTH, -1)
    pipe.execute()


# Pushes ARGV[1] onto KEYS[1] if that list does not exist: checked and pushed in one step.
PUSH_IF_EMPTY = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('RPUSH', KEYS[1], ARGV[1]) end
""")


def accept_first_model(redis, keys, spec):
    """Record `spec` as accepted if nothing is: the version the first worker started with (once,
    however many workers start together)."""
    PUSH_IF_EMPTY(redis, [keys.model_history], [history_entry(spec)])


def forget_newest_model(redis, keys):
    """Drop the newest accepted model (after a rollback to the one before it)."""
    redis.rpop(keys.model_history)


def refuse_model(redis, keys, rollout, worker, reason):
    """Record that `worker` refused rollout number `rollout`, and why."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.refusals(rollout), worker, reason)
    pipe.expire(keys.refusals(rollout), REFUSAL_TTL_S)
    pipe.execute()


def refusals(redis, keys, rollout):
    """{worker: reason} of the workers that refused rollout number `rollout`."""
    return text_hash(redis.hgetall(keys.refusals(rollout)))
