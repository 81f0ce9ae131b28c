"""Lua scripts: the atomic steps of projection.

Each script touches only keys that share one hash tag, so it runs unchanged on Redis
Cluster. The gate (the version recorded for an aggregate) and the writes it guards change
in the same script call, which is what makes a redelivered or duplicated event a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from cqrs.redisio import round_trip

# Money travels as decimal strings with two places; Lua numbers are doubles, exact for
# integers up to 2^53, so sums are done in integer cents.
_MONEY = r"""
local function to_cents(s)
  if not s or s == '' then return 0 end
  local sign = 1
  if string.sub(s, 1, 1) == '-' then sign = -1; s = string.sub(s, 2) end
  local whole, frac = string.match(s, '^(%d+)%.?(%d*)$')
  if not whole then return redis.error_reply('not a money amount: ' .. s) end
  frac = string.sub(frac .. '00', 1, 2)
  return sign * (tonumber(whole) * 100 + tonumber(frac))
end
local function from_cents(c)
  local sign = ''
  if c < 0 then sign = '-'; c = -c end
  return string.format('%s%d.%02d', sign, math.floor(c / 100), c % 100)
end
"""

# KEYS[1] gate hash, KEYS[2] target hash
# ARGV[1] gate field, ARGV[2] event version, ARGV[3] number of ops,
# then ops as (op, field, value) triples, then the target fields to return.
# Returns {status, returned fields...}: status 1 applied, 0 already applied, 2 a
# predecessor is missing (the event must wait; it is not applied), 3 what the event
# updates does not exist (its creation is missing: a gap too, never applied).
# The op `need` writes nothing; it states what must exist before the event applies:
# `need gate` (an update event: the gate must already record a version of the
# aggregate, so a well-formed update with version 1 cannot create a phantom view) and
# `need target` (the target hash must exist: an order counted on a customer view that
# was never registered). They ride in the ops so the ARGV layout stays as it was.
APPLY = (
    _MONEY
    + r"""
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local version = tonumber(ARGV[2])
local nops = tonumber(ARGV[3])
local status = 1
local missing = false
for i = 0, nops - 1 do
  if ARGV[4 + 3 * i] == 'need' then
    local what = ARGV[5 + 3 * i]
    if what == 'gate' then
      missing = missing or stored == 0
    elseif what == 'target' then
      missing = missing or redis.call('EXISTS', KEYS[2]) == 0
    else
      return redis.error_reply('unknown need ' .. what)
    end
  end
end
if version <= stored then
  status = 0
elseif version > stored + 1 then
  status = 2
elseif missing then
  status = 3
else
  for i = 0, nops - 1 do
    local op, field, value = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
    if op == 'need' then
      -- checked above
    elseif op == 'set' then
      redis.call('HSET', KEYS[2], field, value)
    elseif op == 'del' then
      redis.call('HDEL', KEYS[2], field)
    elseif op == 'incr' then
      redis.call('HINCRBY', KEYS[2], field, value)
    elseif op == 'money' then
      local cents = to_cents(redis.call('HGET', KEYS[2], field)) + tonumber(value)
      redis.call('HSET', KEYS[2], field, from_cents(cents))
    else
      return redis.error_reply('unknown op ' .. op)
    end
  end
  redis.call('HSET', KEYS[1], ARGV[1], version)
end
local out = {status}
for i = 4 + 3 * nops, #ARGV do
  out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i]) or false
end
return out
"""
)

# Index bookkeeping for a mutable indexed field (a product's name): remember every value
# that may still be in the index *before* it is added there, so a crash between the index
# writes never leaves an entry nobody knows how to remove.
# KEYS[1] view hash, KEYS[2] set of indexed values; ARGV[1] field.
# Returns {current value or false, members of the set...}.
TRACK = r"""
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then redis.call('SADD', KEYS[2], current) end
local out = {current or false}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = member end
return out
"""

# An index entry computed for the event of `version`: written only if the index does not
# already reflect a later event of that aggregate (recorded per id in a hash of the same
# hash tag). Equal versions write again, so a redelivered event repairs an index update
# its first attempt did not finish; an older one (a worker that stalled past its lease
# and woke up after another applied later events) changes nothing.
# KEYS[1] sorted set, KEYS[2] versions hash; ARGV[1] id, ARGV[2] version, ARGV[3] score,
# ARGV[4] member to add, ARGV[5..] members to remove. Returns 1 if written, else 0.
INDEX = r"""
local stored = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local version = tonumber(ARGV[2])
if version < stored then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
for i = 5, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# A denormalized copy of another aggregate's field (an order's customer name), written only
# on a view that exists (a fan-out must not create a half view) and only if it does not
# already hold a copy from a later version of that aggregate: a worker that stalled past
# its lease mid fan-out cannot put an old name back.
# KEYS[1] hash; ARGV[1] version field, ARGV[2] version, ARGV[3..] field/value pairs.
# Returns 1 if written.
SET_IF_NEWER = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) < stored then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 3))
return 1
"""

# ZADD to a set and read a small hash of the same tag in one step (an order joins its
# customer's list and learns the name the orders projection knows for that customer),
# only when that hash exists: an order of a customer whose registration this projection
# never applied is a gap (a forged or orphaned order must not create an index entry).
# KEYS[1] zset, KEYS[2] hash; ARGV[1] score, ARGV[2] member, ARGV[3..] hash fields.
# Returns {status, fields...}: status 1 added (or already there), 3 the hash is missing.
ZADD_AND_READ = r"""
if redis.call('EXISTS', KEYS[2]) == 0 then return {3} end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
local out = {1}
for i = 3, #ARGV do out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i]) or false end
return out
"""

# Renew a lease only if we still hold it. KEYS[1] lease; ARGV[1] owner, ARGV[2] ms.
RENEW_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SOURCES = {
    "apply": APPLY,
    "track": TRACK,
    "index": INDEX,
    "set_if_newer": SET_IF_NEWER,
    "zadd_and_read": ZADD_AND_READ,
    "renew_lease": RENEW_LEASE,
    "release_lease": RELEASE_LEASE,
}


class Scripts:
    """The scripts registered on one client.

    Single calls go through redis-py's Script (EVALSHA with a transparent reload after a
    Redis restart). Batches use `evalsha` on a pipeline directly: redis-py would otherwise
    send SCRIPT EXISTS before every pipeline that holds a script, one extra round trip per
    round of a batch. Our pipelines instead recover from NOSCRIPT themselves (see
    `projector.steps.run_steps`): `load()` the scripts again and re-send the failed calls.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.by_name = {name: client.register_script(src) for name, src in SOURCES.items()}
        self.shas = {name: script.sha for name, script in self.by_name.items()}
        self._loaded = False

    def __getitem__(self, name: str) -> redis.commands.core.Script:
        return self.by_name[name]

    def load(self) -> None:
        """(Re)load every script into the server's script cache (once per client, and
        again after a NOSCRIPT reply)."""
        for name, source in SOURCES.items():
            self.shas[name] = self.client.script_load(source)
        self._loaded = True

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def command(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> tuple[Any, ...]:
        """An EVALSHA of script `name`, to pack into a round trip with `run`."""
        return ("EVALSHA", self.shas[name], len(keys), *keys, *args)

    def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """`commands` (plain ones and `command`s) in one packed round trip (one per master
        on a cluster), raw replies; calls that got NOSCRIPT are sent again after loading
        the scripts (on every master: a promoted replica starts with an empty script
        cache). A redis-py pipeline would do that on one node but not on a cluster."""
        replies = round_trip(self.client, commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            self.load()
            for i, reply in zip(
                missing, round_trip(self.client, [commands[i] for i in missing]), strict=True
            ):
                replies[i] = reply
        return replies
