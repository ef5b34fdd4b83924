"""The server-side scripts of the Redis counter backend, one per operation.

Each script runs atomically on the Redis node that holds one subject (an
address or an account): every key it touches carries the subject's hash
tag, so in a Redis Cluster they are one slot and the call is one atomic
step, as a ring owner's method is. The client (:mod:`worker.counters.redis_store`)
splits a decision by subject and makes a reservation across them.

Data, per subject tag ``T`` (``{ip:192.0.2.1}``, ``{acct:jan@kowalski.pl}``):

``sg:T:KIND|SERIES|WINDOW``  a hash, bucket index -> count, for the counter
    key ``KIND:subject`` (``sg:{ip:192.0.2.1}:bounce|acc|3600.0`` counts
    ``bounce:192.0.2.1``, series ``acc``, 1 h window); the bucket of time
    ``t`` is ``floor(t / (WINDOW / 60))`` and a bucket is counted while its
    index is at least ``floor(now / width) - 60``, exactly as
    :mod:`worker.counters.window` does; the hash expires when its newest
    bucket stops counting.
``sg:T:counters``  a set naming those hashes, for ``inspect`` and ``reset``.
``sg:T:rsv:RID``  a reservation: ``s`` state (open, released, denied, void,
    reset), ``o`` its outcome, ``e`` what it added ([hash, bucket, amount]...),
    ``x`` when it expires (ms; the key's own ttl follows the server clock); an
    open one keeps its counts then (only a release undoes them).
``sg:T:rsvs``  a sorted set of the subject's reservation ids by expiry, so a
    reset finds the open ones.

Arguments common to every script: ``ARGV[1]`` is the time in seconds, or ""
for the Redis server's own clock (one clock for every host). A decision's
ops are ``ARGV[2]``, one string ``window,max,amount;...`` with max "" for
none (``mark``: ``window,at,amount;...``, at "" for now), one op per counter
hash in ``KEYS``: one argument per call, not three per op, is what keeps
the client's packing cheap.
Outcomes come back as ``{ok, denied, count, ...}`` with ``denied`` the
1-based index of the first op that did not fit, 0 for none.

A write to a hash that is no longer counted anywhere is skipped, and no
bucket goes below zero, as in :class:`~worker.counters.shard.CounterShard`.
"""

from __future__ import annotations

SLOTS = 60

_COMMON = """
local SLOTS = 60

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function field(index)
  return string.format('%.0f', index)
end

-- Count of one counter hash at `now`; with `prune`, drop buckets out of the window.
local function count(name, width, now, prune)
  local low = math.floor(now / width) - SLOTS
  local flat = redis.call('HGETALL', name)
  local total, stale = 0, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) >= low then
      total = total + tonumber(flat[i + 1])
    else
      stale[#stale + 1] = flat[i]
    end
  end
  if prune and #stale > 0 then
    redis.call('HDEL', name, unpack(stale))
  end
  return total
end

-- Keep `name` until `ms` (epoch milliseconds), never shortening its life.
local function keep_until(name, ms)
  redis.call('PEXPIREAT', name, field(ms), 'NX')
  redis.call('PEXPIREAT', name, field(ms), 'GT')
end

-- Add `amount` (possibly negative) to one bucket, never below zero; returns what changed.
local function bump(name, index, amount)
  local f = field(index)
  local new = redis.call('HINCRBY', name, f, amount)
  if new <= 0 then
    redis.call('HDEL', name, f)
    return amount - new
  end
  return amount
end

-- When bucket `index` of a window of `width` seconds stops counting, in ms.
local function ends_ms(index, width)
  return math.ceil((index + SLOTS + 1) * width * 1000)
end

-- ARGV[2]: "window,max,amount;..." (max "" for none); for mark() "window,at,amount;...".
local function parse_ops(text)
  local ops = {}
  for window, middle, amount in string.gmatch(text, '([^,;]+),([^,;]*),([^,;]+)') do
    ops[#ops + 1] = {tonumber(window) / SLOTS, middle, tonumber(amount)}
  end
  return ops
end

-- Evaluate `ops` on KEYS[first..]: {ok, denied, counts...}, counts by op.
local function evaluate(first, ops, now, prune)
  local out = {1, 0}
  local seen, pending = {}, {}
  for i, op in ipairs(ops) do
    local name = KEYS[first + i - 1]
    local width, limit, amount = op[1], op[2], op[3]
    local c = seen[name]
    if c == nil then
      c = count(name, width, now, prune)
      seen[name] = c
    end
    out[2 + i] = c
    local added = (pending[name] or 0) + amount
    pending[name] = added
    if out[2] == 0 and limit ~= '' and c + added > tonumber(limit) then
      out[1], out[2] = 0, i
    end
  end
  return out
end

-- Add every positive amount at `now`; the entries a release would undo.
local function apply(first, ops, now, index_set)
  local entries, names, last = {}, {}, 0
  for i, op in ipairs(ops) do
    local name = KEYS[first + i - 1]
    local width, amount = op[1], op[3]
    if amount > 0 then
      local index = math.floor(now / width)
      local applied = bump(name, index, amount)
      local ends = ends_ms(index, width)
      keep_until(name, ends)
      names[#names + 1] = name
      if ends > last then last = ends end
      entries[#entries + 1] = {name, field(index), applied}
    end
  end
  if #names > 0 then
    redis.call('SADD', index_set, unpack(names))
    keep_until(index_set, last)
  end
  return entries
end
"""

# KEYS: counter hashes.  ARGV: now, ops.
CHECK = _COMMON + """
return evaluate(1, parse_ops(ARGV[2]), clock(ARGV[1]), false)
"""

# KEYS: index set, counter hashes.  ARGV: now, ops.
ADD = _COMMON + """
local now = clock(ARGV[1])
local ops = parse_ops(ARGV[2])
local out = evaluate(2, ops, now, true)
apply(2, ops, now, KEYS[1])
return out
"""

# KEYS: reservation, reservation index, index set, counter hashes.
# ARGV: now, ops, rid, ttl (seconds).
# A known rid returns its first outcome and adds nothing (a retry, or a
# release that overtook it: then it is "void" and answers "denied").
RESERVE = _COMMON + """
local now = clock(ARGV[1])
local now_ms = math.floor(now * 1000)
local ttl_ms = math.ceil(tonumber(ARGV[4]) * 1000)
local known = redis.call('HMGET', KEYS[1], 's', 'o', 'x')
if known[1] and tonumber(known[3]) > now_ms then
  local out = cjson.decode(known[2])
  if known[1] == 'void' then out[1], out[2] = 0, 1 end
  return out
end
local ops = parse_ops(ARGV[2])
local out = evaluate(4, ops, now, true)
local state, entries = 'denied', {}
if out[1] == 1 then
  state = 'open'
  entries = apply(4, ops, now, KEYS[3])
end
redis.call('HSET', KEYS[1], 's', state, 'o', cjson.encode(out), 'e', cjson.encode(entries),
           'x', field(now_ms + ttl_ms))
redis.call('PEXPIRE', KEYS[1], field(ttl_ms))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', field(now_ms))
redis.call('ZADD', KEYS[2], field(now_ms + ttl_ms), ARGV[3])
keep_until(KEYS[2], now_ms + ttl_ms)
return out
"""

# KEYS: reservation, counter hashes it touched.  ARGV: now, ttl, rid.
# 1 when released (also again), 0 when there was nothing to release
# (unknown, expired, denied, reset). An unknown rid leaves a "void" mark: a
# reserve that arrives after its own release (a retry on another
# connection) must not count.
RELEASE = _COMMON + """
local now_ms = math.floor(clock(ARGV[1]) * 1000)
local ttl_ms = math.ceil(tonumber(ARGV[2]) * 1000)
local rec = redis.call('HMGET', KEYS[1], 's', 'x')
if not rec[1] then
  redis.call('HSET', KEYS[1], 's', 'void', 'o', '[0,0]', 'e', '[]', 'x', field(now_ms + ttl_ms))
  redis.call('PEXPIRE', KEYS[1], field(ttl_ms))
  return 0
end
if tonumber(rec[2]) <= now_ms then return 0 end
if rec[1] == 'released' then return 1 end
if rec[1] ~= 'open' then return 0 end
for _, entry in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'e'))) do
  if redis.call('EXISTS', entry[1]) == 1 then
    bump(entry[1], tonumber(entry[2]), -entry[3])
  end
end
redis.call('HSET', KEYS[1], 's', 'released', 'e', '[]')
return 1
"""

# KEYS: index set, counter hashes.  ARGV: now, ops ("window,at,amount;...").
MARK = _COMMON + """
local now = clock(ARGV[1])
for i, op in ipairs(parse_ops(ARGV[2])) do
  local name = KEYS[i + 1]
  local width, at, amount = op[1], op[2], op[3]
  local index = math.floor((at == '' and now or tonumber(at)) / width)
  if amount ~= 0 and index >= math.floor(now / width) - SLOTS then
    if amount < 0 then
      if redis.call('EXISTS', name) == 1 then bump(name, index, amount) end
    else
      bump(name, index, amount)
      local ends = ends_ms(index, width)
      keep_until(name, ends)
      redis.call('SADD', KEYS[1], name)
      keep_until(KEYS[1], ends)
    end
  end
end
return 1
"""

# KEYS: index set.  ARGV: now, then the hash-name prefixes ("sg:T:KIND|") asked for.
# Per counter with a count: {name, {bucket, count, bucket, count, ...}}, counted buckets only.
INSPECT = _COMMON + """
local now = clock(ARGV[1])
local rows = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for p = 2, #ARGV do
    if string.sub(name, 1, #ARGV[p]) == ARGV[p] then
      local width = tonumber(string.match(name, '|([^|]*)$')) / SLOTS
      local low = math.floor(now / width) - SLOTS
      local flat = redis.call('HGETALL', name)
      local live = {}
      for i = 1, #flat, 2 do
        if tonumber(flat[i]) >= low and tonumber(flat[i + 1]) > 0 then
          live[#live + 1] = flat[i]
          live[#live + 1] = flat[i + 1]
        end
      end
      if #live > 0 then rows[#rows + 1] = {name, live} end
      break
    end
  end
end
return rows
"""

# KEYS: index set, reservation index.  ARGV: now, then the hash-name prefixes.
# Deletes every counter of those keys and takes their part out of every open
# reservation, so a later release cannot subtract from counts made after the
# reset. Returns how many counters held a count.
RESET = _COMMON + """
local now = clock(ARGV[1])
local function wanted(name)
  for p = 2, #ARGV do
    if string.sub(name, 1, #ARGV[p]) == ARGV[p] then return true end
  end
  return false
end
local cleared = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if wanted(name) then
    if redis.call('EXISTS', name) == 1 then cleared = cleared + 1 end
    redis.call('DEL', name)
    redis.call('SREM', KEYS[1], name)
  end
end
local prefix = string.sub(KEYS[2], 1, #KEYS[2] - 4) .. 'rsv:'
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', field(math.floor(now * 1000)))
for _, rid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = prefix .. rid
  if redis.call('HGET', key, 's') == 'open' then
    local kept = {}
    for _, entry in ipairs(cjson.decode(redis.call('HGET', key, 'e'))) do
      if not wanted(entry[1]) then kept[#kept + 1] = entry end
    end
    if #kept == 0 then
      redis.call('HSET', key, 's', 'reset', 'e', '[]')
    else
      redis.call('HSET', key, 'e', cjson.encode(kept))
    end
  end
end
return cleared
"""
