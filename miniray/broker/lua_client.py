"""The scripts of the client's side: a job's chunks published (``publish``, a lone submit's
``publish_one`` straight to a waiting slot), withdrawn or stopped (``cancel_chunk``,
``stop_chunks``), the job closed (``cancel_job``) and a kept job sealed (``seal``).

Each is ``PRELUDE`` (``lua_prelude``) and its body; the comment above it names its ARGV.
"""

from .lua_prelude import PRELUDE

__all__ = ["PUBLISH", "PUBLISH_ONE", "CANCEL_CHUNK", "STOP_CHUNKS", "CANCEL_JOB", "SEAL"]

# ARGV: ns job priority n_chunks n_items maxlen
PUBLISH = PRELUDE + r"""
local job = ARGV[2]
local jk = K('job', job)
local m = redis.call('HMGET', jk, 'state', unpack(REQ))
if m[1] ~= 'open' then return 0 end
redis.call('ZADD', K('jobs'), ARGV[3], job)
redis.call('HINCRBY', jk, 'queued', ARGV[5])
wake(tonumber(ARGV[4]), requirements(m[2], m[3], m[4], m[5], m[6]))
event(job, ARGV[6], 'kind', 'queued', 'count', ARGV[5])
return 1
"""

# ARGV: ns job priority entry payload maxlen -- one chunk of one frame (a lone submit): its
#   payload is stored, and with a slot waiting that can run it (the job has no requirements)
#   the chunk goes to that slot at once, as its claim would take it (wip, counters, the
#   "started" event), as the claim's reply in hand:{slot} (HAND_LEN elements), which the
#   slot's wait pops ahead of its wake-ups (and a claim returns first). Else it is queued
#   (as publish does).
PUBLISH_ONE = PRELUDE + r"""
local job, entry, payload = ARGV[2], ARGV[4], ARGV[5]
local jk = K('job', job)
local m = redis.call('HMGET', jk, 'state', 'spec', unpack(REQ))
if m[1] ~= 'open' then return 0 end
local chunk, nframes, items = parse(entry)
redis.call('HSET', K('tasks', job), chunk, payload)
event(job, ARGV[6], 'kind', 'queued', 'count', items)
local req = requirements(m[3], m[4], m[5], m[6], m[7])
local w = not req and pop_waiter()
if w then
  local wid, slot = string.match(w, '^(.*)/(%d+)$')
  redis.call('HSET', K('wip', wid), job .. '/' .. chunk, entry .. '@' .. slot)
  redis.call('HINCRBY', jk, 'running', items)
  event(job, ARGV[6], 'kind', 'started', 'worker', wid, 'count', items, 'chunks', chunk)
  redis.call('RPUSH', K('hand', w), job, m[2] or '', entry, payload)
  return 1
end
redis.call('RPUSH', K('q', job), entry)
redis.call('ZADD', K('jobs'), ARGV[3], job)
redis.call('HINCRBY', jk, 'queued', items)
wake(1, req)
return 1
"""

# ARGV: ns job entry
CANCEL_CHUNK = PRELUDE + r"""
local job, entry = ARGV[2], ARGV[3]
if redis.call('LREM', K('q', job), 1, entry) == 0 then return 0 end
local chunk, nframes, items = parse(entry)
redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
redis.call('HINCRBY', K('job', job), 'queued', -items)
redis.call('HINCRBY', K('job', job), 'cancelled', items)
return 1
"""

# ARGV: ns job maxlen entry1 entry2 ... -> the chunk ids stopped or withdrawn (not those that
#   have finished: their outcomes count as they are). A queued chunk is withdrawn (as
#   cancel_chunk); one a worker holds joins stop:{job}, which the workers' heartbeats read,
#   and its items not reported yet count as cancelled now (complete then counts nothing of it)
STOP_CHUNKS = PRELUDE + r"""
local job = ARGV[2]
local jk = K('job', job)
local sk, ak = K('stop', job), K('attempts', job)
if redis.call('HGET', jk, 'state') ~= 'open' then return {} end
local out, queued, moved, stopped = {}, 0, 0, {}
for i = 4, #ARGV do
  local entry = ARGV[i]
  local chunk, nframes, items = parse(entry)
  if redis.call('LREM', K('q', job), 1, entry) == 1 then
    redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
    queued = queued + items
    out[#out + 1] = chunk
  elseif redis.call('HEXISTS', K('tasks', job), chunk) == 1
      and redis.call('SISMEMBER', sk, chunk) == 0 then
    -- held by a worker (its payload goes when it finishes)
    local part = redis.call('HMGET', ak, 'd' .. chunk, 'f' .. chunk)
    moved = moved + items - (tonumber(part[1]) or 0) - (tonumber(part[2]) or 0)
    stopped[#stopped + 1] = chunk
    out[#out + 1] = chunk
  end
end
if #stopped > 0 then
  redis.call('SADD', sk, unpack(stopped))
  local ttl = redis.call('TTL', jk)
  if ttl > 0 then redis.call('EXPIRE', sk, ttl) end
end
if queued + moved > 0 then
  redis.call('HINCRBY', jk, 'queued', -queued)
  redis.call('HINCRBY', jk, 'running', -moved)
  redis.call('HINCRBY', jk, 'cancelled', queued + moved)
  event(job, ARGV[3], 'kind', 'stopped', 'count', queued + moved,
        'chunks', table.concat(out, ','))
end
if redis.call('LLEN', K('q', job)) == 0 then redis.call('ZREM', K('jobs'), job) end
finish_kept(job, ARGV[3])
return out
"""

# ARGV: ns job new_state maxlen -> entries that were still queued
CANCEL_JOB = PRELUDE + r"""
local job = ARGV[2]
local jk = K('job', job)
local entries = redis.call('LRANGE', K('q', job), 0, -1)
local items = 0
for _, e in ipairs(entries) do local c, f, n = parse(e); items = items + n end
redis.call('DEL', K('q', job), K('tasks', job))
redis.call('ZREM', K('jobs'), job)
if redis.call('EXISTS', jk) == 1 then
  local moved = items
  if ARGV[3] == 'cancelled' then
    -- its running tasks are interrupted and their futures cancelled: they count as
    -- cancelled now (complete counts nothing of a cancelled job), so running ends at 0
    local running = tonumber(redis.call('HGET', jk, 'running') or '0') or 0
    if running > 0 then moved = moved + running end
    local t = redis.call('TIME')
    redis.call('HSET', jk, 'running', 0, 'finished', t[1] .. '.' .. string.format('%06d', t[2]))
  end
  redis.call('HSET', jk, 'state', ARGV[3])
  redis.call('HINCRBY', jk, 'queued', -items)
  redis.call('HINCRBY', jk, 'cancelled', moved)
  event(job, ARGV[4], 'kind', ARGV[3], 'count', items)
end
return entries
"""

# ARGV: ns job total maxlen -- a kept job's client submits no more: ``total`` items in all
#   (the job ends once they all have: finish_kept)
SEAL = PRELUDE + r"""
local jk = K('job', ARGV[2])
if redis.call('HGET', jk, 'state') ~= 'open' then return 0 end
redis.call('HSET', jk, 'sealed', 1, 'total', ARGV[3])
finish_kept(ARGV[2], ARGV[4])
return 1
"""
