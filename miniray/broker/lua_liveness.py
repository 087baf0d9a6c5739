"""The scripts that keep the cluster's picture of who lives: a worker's ``heartbeat``, the
``reap`` of workers not heard from (their chunks requeued or failed), and ``release`` of a
worker that leaves cleanly.

Each is ``PRELUDE`` (``lua_prelude``) and its body; the comment above it names its ARGV.
"""

from .lua_prelude import PRELUDE

__all__ = ["HEARTBEAT", "REAP", "RELEASE"]

# ARGV: ns worker info_json ttl stall rejoin job1 job2 ... -> {server_time, cancelled jobs...,
#   "job/chunk" per chunk its client stopped (stop:{job}) of the open ones}
HEARTBEAT = PRELUDE + r"""
local wid = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
tick(now, tonumber(ARGV[5]))
if ARGV[6] == '1' and not redis.call('ZSCORE', K('workers'), wid) then
  -- registering again: a worker taken for dead while it lived (paused, a lost link) had its
  -- slots' idle registrations dropped (forget_waiters), and they wait on in a long blocking
  -- pop that nothing would end: a wake-up each makes them look for work and register again
  local ok, info = pcall(cjson.decode, ARGV[3])
  local n = ok and type(info) == 'table' and tonumber(info.slots) or 0
  for slot = 0, n - 1 do redis.call('RPUSH', K('wake', wid .. '/' .. slot), '1') end
end
redis.call('ZADD', K('workers'), now, wid)
redis.call('HSET', K('worker', wid), 'info', ARGV[3], 'seen', tostring(now))
redis.call('EXPIRE', K('worker', wid), ARGV[4])
local out = {tostring(now)}
for i = 7, #ARGV do
  local st = redis.call('HGET', K('job', ARGV[i]), 'state')
  if st ~= 'open' and st ~= 'closing' then
    out[#out + 1] = ARGV[i]
  elseif redis.call('EXISTS', K('stop', ARGV[i])) == 1 then
    for _, c in ipairs(redis.call('SMEMBERS', K('stop', ARGV[i]))) do
      out[#out + 1] = ARGV[i] .. '/' .. c
    end
  end
end
return out
"""

# ARGV: ns dead_after max_retries maxlen ttl -> number of workers reaped
REAP = PRELUDE + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
tick(now, tonumber(ARGV[2]) / 2)
local dead = redis.call('ZRANGEBYSCORE', K('workers'), '-inf', now - tonumber(ARGV[2]))
local max_retries = tonumber(ARGV[3])
for _, wid in ipairs(dead) do
  forget_waiters(wid)  -- first: what is requeued below must wake a live slot
  local wip = redis.call('HGETALL', K('wip', wid))
  for i = 1, #wip, 2 do
    local job, chunk = string.match(wip[i], '^(.*)/(%d+)$')
    local entry = string.match(wip[i + 1], '^[^@]*')
    local jk = K('job', job)
    local tries = redis.call('HINCRBY', K('attempts', job), chunk, 1)
    if tries > max_retries then
      local c, nframes, items = parse(entry)
      redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
      local meta = redis.call('HMGET', jk, 'client', 'state')
      local part = redis.call('HMGET', K('attempts', job), 'd' .. chunk, 'f' .. chunk)
      -- the items not reported yet fail (WorkerLostError); a cancelled job counted them
      local rest = items - (tonumber(part[1]) or 0) - (tonumber(part[2]) or 0)
      local client = meta[1]
      -- (a cancelled job, or a chunk its client stopped, counted them as cancelled)
      if meta[2] == 'cancelled' or redis.call('SISMEMBER', K('stop', job), chunk) == 1 then
        client = nil
      end
      if client then
        redis.call('HINCRBY', jk, 'running', -rest)
        redis.call('HINCRBY', jk, 'failed', rest)
        redis.call('RPUSH', K('res', client), 'L' .. job .. '|' .. chunk .. '|' .. wid)
        redis.call('EXPIRE', K('res', client), ARGV[5])
      end
      event(job, ARGV[4], 'kind', 'lost', 'worker', wid, 'chunk', chunk)
      finish_kept(job, ARGV[4])
    else
      if requeue(job, entry, wid) == 1 then
        event(job, ARGV[4], 'kind', 'retried', 'worker', wid, 'chunk', chunk)
      end
    end
  end
  redis.call('DEL', K('wip', wid), K('worker', wid))
  redis.call('ZREM', K('workers'), wid)
end
return #dead
"""

# ARGV: ns worker -> chunks handed back (a worker leaving cleanly; no retry is counted)
RELEASE = PRELUDE + r"""
local wid = ARGV[2]
forget_waiters(wid)  -- first: what is requeued below must wake a live slot
local wip = redis.call('HGETALL', K('wip', wid))
local n = 0
for i = 1, #wip, 2 do
  local job = string.match(wip[i], '^(.*)/%d+$')
  n = n + requeue(job, string.match(wip[i + 1], '^[^@]*'), wid)
end
redis.call('DEL', K('wip', wid), K('worker', wid))
redis.call('ZREM', K('workers'), wid)
return n
"""
