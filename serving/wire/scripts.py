"""Lua scripts that Redis runs by their SHA1, alone or in a round trip with other commands."""
import hashlib

from redis.exceptions import NoScriptError


class Script:
    """A Lua script that Redis runs by its SHA1 (EVALSHA). Redis forgets scripts when it restarts
    or fails over: then it is sent whole once more (EVAL caches it again). A script that was not
    found did not run, so that is safe."""

    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client, keys, args):
        try:
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.execute_command("EVAL", self.source, len(keys), *keys, *args)

    def queue(self, pipe, keys, args):
        """Add a call to a pipeline, by SHA1 (see RoundTrip for a script Redis lacks)."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class RoundTrip:
    """Commands and scripts sent together (a pipeline, not a transaction); execute() returns their
    replies in order and raises the first error. A script that Redis did not know (it forgets them
    on a restart or failover) did not run: it is then run again whole, after the others (every
    use here allows that order)."""

    def __init__(self, redis):
        self.redis, self.pipe, self.scripts = redis, redis.pipeline(transaction=False), {}

    def script(self, script, keys, args):
        self.scripts[len(self.pipe)] = (script, keys, args)
        script.queue(self.pipe, keys, args)

    def execute(self):
        replies = self.pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError) and i in self.scripts:
                script, keys, args = self.scripts[i]
                replies[i] = script(self.redis, keys, args)
            elif isinstance(reply, Exception):
                raise reply
        return replies
