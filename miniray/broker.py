"""Atomic operations on the Redis key schema (``keys.py``): Lua scripts and their Python calls.

Every state change that touches more than one key happens in one script, so a crash between
two commands can never lose or duplicate a task: claiming moves a chunk from its job's queue
into the worker's ``wip`` hash in one step; the reaper moves a dead worker's ``wip`` back.
Scripts build key names with the same spelling as ``keys.py`` (see its table).
"""

from __future__ import annotations

import hashlib
import json
import time

from .errors import ConfigurationError, ServerError
from .keys import Keys
from .resp import Connection, NoScriptError, RedisError, ReplyError, redact

__all__ = ["HAND_LEN", "Broker", "connect", "job_ttl", "parse_claim"]

HAND_LEN = 4  # list elements of a chunk handed to a slot: job, spec, entry, frame (publish_one)

# Shared Lua helpers. `entry` is "<chunk>:<nframes>:<items>".
_PRELUDE = r"""
local ns = ARGV[1]
local function K(a, b)  -- a key name (one or two parts after the namespace)
  if b then return ns .. ':' .. a .. ':' .. b end
  return ns .. ':' .. a
end
local function parse(entry)
  local c, f, n = string.match(entry, '^(%d+):(%d+):(%d+)$')
  return c, tonumber(f), tonumber(n)
end
local function payload_fields(chunk, nframes)
  local fields = {chunk}
  for i = 1, nframes - 1 do fields[#fields + 1] = chunk .. '.' .. i end
  return fields
end
local function event(job, maxlen, ...)
  redis.call('XADD', K('events', job), 'MAXLEN', '~', maxlen, '*', ...)
end
local function can_run(wid, req)
  -- whether worker wid could ever run a job with these requirements (its heartbeat's info);
  -- what is free right now its claim decides
  local ok, info = pcall(cjson.decode, redis.call('HGET', K('worker', wid), 'info') or '')
  if not ok or type(info) ~= 'table' then return true end  -- not known yet: let it look
  local gpus = type(info.gpus) == 'table' and #info.gpus or 0
  if gpus < req.gpus then return false end
  if req.cpus > 0 and (tonumber(info.cpus) or 0) > 0 and tonumber(info.cpus) < req.cpus then
    return false
  end
  if req.triton and not info.triton then return false end
  if req.nodes then
    return string.find(req.nodes, ',' .. tostring(info.name) .. ',', 1, true) ~= nil
        or string.find(req.nodes, ',' .. tostring(info.host) .. ',', 1, true) ~= nil
  end
  return true
end
local function requirements(gpus, cpus, nodes, gpu_mem, triton)
  -- a job's req_* fields (in this order) as wake() takes them: nil when it has none
  gpus, cpus = tonumber(gpus) or 0, tonumber(cpus) or 0
  if gpus == 0 and (tonumber(gpu_mem) or 0) > 0 then gpus = 1 end
  if nodes == '' then nodes = nil end
  if gpus > 0 or cpus > 0 or nodes or triton == '1' then
    return {gpus = gpus, cpus = cpus, nodes = nodes or nil, triton = triton == '1'}
  end
end
local REQ = {'req_gpus', 'req_cpus', 'req_nodes', 'req_gpu_mem', 'req_triton'}
local function pop_waiter()
  -- the slot that went idle last (taken out of idle), or nil; a slot of a worker that left
  -- may have registered as it went: it is dropped
  while true do
    local w = redis.call('ZPOPMAX', K('idle'))
    if #w == 0 then return nil end
    if redis.call('ZSCORE', K('workers'), string.match(w[1], '^(.*)/%d+$')) then return w[1] end
  end
end
local function wake(n, req)
  -- wake-ups for the n slots that went idle last: a process that has just finished a task
  -- takes the next one while its caches are warm; no slot waiting, no token (see
  -- pop_waiter). For a job with
  -- requirements (see requirements()) slots of workers that can never run it stay idle:
  -- waking them would leave the work waiting for a fitting slot's timeout
  if not req then
    while n > 0 do
      local w = pop_waiter()
      if not w then return end
      redis.call('RPUSH', K('wake', w), '1')
      n = n - 1
    end
    return
  end
  local fit = {}
  for _, w in ipairs(redis.call('ZREVRANGE', K('idle'), 0, -1)) do
    if n <= 0 then return end
    local wid = string.match(w, '^(.*)/%d+$')
    if not redis.call('ZSCORE', K('workers'), wid) then
      redis.call('ZREM', K('idle'), w)
    else
      if fit[wid] == nil then fit[wid] = can_run(wid, req) end
      if fit[wid] then
        redis.call('ZREM', K('idle'), w)
        redis.call('RPUSH', K('wake', w), '1')
        n = n - 1
      end
    end
  end
end
local function forget_waiters(wid)
  -- a worker leaves: its slots wait no more (call before its worker hash goes)
  local prefix = wid .. '/'
  for _, w in ipairs(redis.call('ZRANGE', K('idle'), 0, -1)) do
    if string.sub(w, 1, #prefix) == prefix then redis.call('ZREM', K('idle'), w) end
  end
  local ok, info = pcall(cjson.decode, redis.call('HGET', K('worker', wid), 'info') or '')
  local n = ok and type(info) == 'table' and tonumber(info.slots) or 0
  for slot = 0, n - 1 do
    redis.call('DEL', K('wake', prefix .. slot), K('hand', prefix .. slot))
  end
end
local function tick(now, stall)
  -- The server's clock as its heartbeats and reaps see it. A gap longer than ``stall`` with
  -- neither means nobody could be heard (the server, or the whole machine, was stopped:
  -- SIGSTOP, a suspended VM): every worker's last heartbeat moves on by the gap, so that
  -- nobody is taken for dead for the server's own pause.
  local last = tonumber(redis.call('GET', K('clock')) or '')
  redis.call('SET', K('clock'), string.format('%.6f', now))
  if last and now - last > stall then
    local ws = redis.call('ZRANGE', K('workers'), 0, -1, 'WITHSCORES')
    for i = 1, #ws, 2 do
      redis.call('ZADD', K('workers'), tonumber(ws[i + 1]) + (now - last), ws[i])
    end
  end
end
local function finish_kept(job, maxlen)
  -- a kept job (see miniray.client.keep) whose client sealed it ends here once every item has
  -- ended: its client may be dead, and nobody else would say so
  local jk = K('job', job)
  local m = redis.call('HMGET', jk, 'keep', 'sealed', 'state', 'total', 'queued', 'running',
                       'done', 'failed', 'cancelled')
  if not m[1] or m[2] ~= '1' or m[3] ~= 'open' then return end
  if (tonumber(m[5]) or 0) > 0 or (tonumber(m[6]) or 0) > 0 then return end
  local ended = (tonumber(m[7]) or 0) + (tonumber(m[8]) or 0) + (tonumber(m[9]) or 0)
  if ended < (tonumber(m[4]) or 0) then return end
  local t = redis.call('TIME')
  redis.call('HSET', jk, 'state', 'done', 'finished', t[1] .. '.' .. string.format('%06d', t[2]))
  redis.call('ZREM', K('jobs'), job)
  event(job, maxlen, 'kind', 'done')
end
local function go_idle(waiter, score)
  -- a slot about to wait: with work queued it wakes itself (its claim after the wait looks),
  -- else it registers as idle, atomically with seeing none, so the next work wakes it
  if redis.call('ZCARD', K('jobs')) > 0 then
    redis.call('RPUSH', K('wake', waiter), '1')
  else
    redis.call('ZADD', K('idle'), score, waiter)
  end
end
local function requeue(job, entry, wid)
  -- put a chunk back at the front of its job's queue, if the job still wants it. Outcomes
  -- its holder reported before it was lost (``d<chunk>``/``f<chunk>`` in attempts:) are
  -- reported again by the rerun: they leave the counters now (kept as ``sd``/``sf``, for
  -- a lost holder that comes back and finishes the chunk itself: see complete), so that
  -- every item is counted once
  local jk = K('job', job)
  local meta = redis.call('HMGET', jk, 'state', 'priority', unpack(REQ))
  local chunk, nframes, items = parse(entry)
  local ak = K('attempts', job)
  local part = redis.call('HMGET', ak, 'd' .. chunk, 'f' .. chunk)
  local d, f = tonumber(part[1]) or 0, tonumber(part[2]) or 0
  if redis.call('SISMEMBER', K('stop', job), chunk) == 1 then
    -- its client stopped it (stop_chunks counted its items as cancelled): it runs no more
    redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
    return 0
  end
  if meta[1] ~= 'open' then
    redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
    -- (a cancelled job's running items were counted as cancelled when it was cancelled)
    if meta[1] ~= 'cancelled' then redis.call('HINCRBY', jk, 'running', -(items - d - f)) end
    local client = meta[1] == 'closing' and redis.call('HGET', jk, 'client')
    if client then
      -- shutdown(cancel_futures=True) dropped the job's queue and payloads, and its client
      -- waits for this running chunk: it cannot run again, so its items fail (WorkerLostError)
      redis.call('HINCRBY', jk, 'failed', items - d - f)
      redis.call('RPUSH', K('res', client), 'L' .. job .. '|' .. chunk .. '|' .. (wid or '?')
                 .. '|closing')
      redis.call('EXPIRE', K('res', client), redis.call('HGET', jk, 'grace') or 600)
    end
    return 0
  end
  if d + f > 0 then
    redis.call('HDEL', ak, 'd' .. chunk, 'f' .. chunk)
    redis.call('HINCRBY', ak, 'sd' .. chunk, d)
    redis.call('HINCRBY', ak, 'sf' .. chunk, f)
    redis.call('HINCRBY', jk, 'done', -d)
    redis.call('HINCRBY', jk, 'failed', -f)
  end
  redis.call('LPUSH', K('q', job), entry)
  redis.call('ZADD', K('jobs'), meta[2], job)
  redis.call('HINCRBY', jk, 'running', -(items - d - f))
  redis.call('HINCRBY', jk, 'queued', items)
  wake(1, requirements(meta[3], meta[4], meta[5], meta[6], meta[7]))
  return 1
end
"""

# ARGV: ns job priority n_chunks n_items maxlen
_PUBLISH = _PRELUDE + r"""
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
_PUBLISH_ONE = _PRELUDE + r"""
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

# ARGV: ns worker max_chunks name host free_gpus cpus gpu_free_mb triton slot maxlen register
#   known
#   free_gpus: GPUs nobody holds; gpu_free_mb: "mb,mb,.." unreserved MiB per GPU that packed
#   tasks may share ("" when none); triton: "1" when the worker's Triton server is healthy;
#   slot: the worker's slot that claims (its wip values are tagged "entry@slot");
#   maxlen: of the job's event stream, which gets a "started" event for what is claimed;
#   register: "" or a score: when nothing is claimed, the slot registers in `idle` with it
#   (atomically with finding nothing, so work published after this wakes it);
#   known: "" or ",job=n,job=n,...": of a job not named there the claim takes one chunk, of a
#   named one at most n (a task process sizes what it holds by how long each job's take)
# Returns {} or {job, spec_json, chunk, entry, frame0, frame1.., chunk, entry, ...}
_CLAIM = _PRELUDE + r"""
local wid, maxn = ARGV[2], tonumber(ARGV[3])
local name, host = ARGV[4], ARGV[5]
local gpus, cpus = tonumber(ARGV[6]), tonumber(ARGV[7])
local gpu_free_mb = {}
if (ARGV[8] or '') ~= '' then
  for x in string.gmatch(ARGV[8], '[^,]+') do gpu_free_mb[#gpu_free_mb + 1] = tonumber(x) end
end
local triton = ARGV[9] == '1'
local tag = '@' .. (ARGV[10] or '')
local known = ARGV[13] or ''
local function gpus_fit(want, mb)
  if want == 0 then return true end
  if mb == 0 then return want <= gpus end
  local n = 0
  for _, f in ipairs(gpu_free_mb) do if f >= mb then n = n + 1 end end
  return n >= want
end
-- a chunk handed to this slot (_PUBLISH_ONE) that its wait did not pop: ours already
local handed = redis.call('LPOP', K('hand', wid .. '/' .. (ARGV[10] or '')), 4)
if handed then return handed end
-- only a registered worker may hold work, so the reaper can always find what it holds
if not redis.call('ZSCORE', K('workers'), wid) then return {} end
local jobs = redis.call('ZREVRANGE', K('jobs'), 0, 255, 'WITHSCORES')
local spec, reqs = {}, {}
local i = 1
while i <= #jobs do
  local prio = jobs[i + 1]
  local tier = {}
  while i <= #jobs and jobs[i + 1] == prio do
    local job = jobs[i]
    local jk = K('job', job)
    local m = redis.call('HMGET', jk, 'client', 'state', 'req_gpus', 'req_cpus', 'req_nodes',
                         'req_gpu_mem', 'req_triton', 'spec', 'keep')
    if m[2] ~= 'open' then
      redis.call('ZREM', K('jobs'), job)
      -- expired (a kept job whose client died, past its grace): its work goes with it
      if not m[2] then redis.call('DEL', K('q', job), K('tasks', job)) end
    elseif not m[9] and redis.call('EXISTS', K('client', m[1])) == 0 then
      -- the executor that owns the job was not heard from for its grace (it died, or it is
      -- paused for longer): the job is given up, with the results nobody collected
      redis.call('HSET', jk, 'state', 'orphaned')
      redis.call('DEL', K('q', job), K('tasks', job), K('res', m[1]))
      redis.call('ZREM', K('jobs'), job)
    else
      local fits = gpus_fit(tonumber(m[3]) or 0, tonumber(m[6]) or 0)
          and ((tonumber(m[4]) or 0) <= cpus or cpus == 0)
          and (m[7] ~= '1' or triton)
      if fits and m[5] and m[5] ~= '' then
        fits = string.find(m[5], ',' .. name .. ',', 1, true) ~= nil
            or string.find(m[5], ',' .. host .. ',', 1, true) ~= nil
      end
      if fits then
        tier[#tier + 1] = job
        spec[job] = m[8]
        reqs[job] = requirements(m[3], m[4], m[5], m[6], m[7])
      end
    end
    i = i + 2
  end
  while #tier > 0 do
    local pick = 1
    if #tier > 1 then pick = (redis.call('INCR', K('rr')) % #tier) + 1 end
    local job = tier[pick]
    local take = maxn
    if known ~= '' then
      local at = string.find(known, ',' .. job .. '=', 1, true)
      take = at and math.min(maxn, tonumber(string.match(known, '^%d+', at + #job + 2))) or 1
    end
    local entries = redis.call('LPOP', K('q', job), take)
    if redis.call('LLEN', K('q', job)) == 0 then
      redis.call('ZREM', K('jobs'), job)
    elseif entries then
      wake(1, reqs[job])  -- work is left: a waiting slot that can run it must not wait in vain
    end
    if entries then
      local jk = K('job', job)
      local out = {job, spec[job]}
      local items_total = 0
      local ids = {}
      for _, entry in ipairs(entries) do
        local chunk, nframes, items = parse(entry)
        ids[#ids + 1] = chunk
        local frames = redis.call('HMGET', K('tasks', job), unpack(payload_fields(chunk, nframes)))
        redis.call('HSET', K('wip', wid), job .. '/' .. chunk, entry .. tag)
        out[#out + 1] = entry
        for _, fr in ipairs(frames) do out[#out + 1] = fr end
        items_total = items_total + items
      end
      redis.call('HINCRBY', jk, 'queued', -items_total)
      redis.call('HINCRBY', jk, 'running', items_total)
      redis.call('ZREM', K('idle'), wid .. '/' .. (ARGV[10] or ''))  -- busy now: no wake-ups
      event(job, ARGV[11], 'kind', 'started', 'worker', wid, 'count', items_total,
            'chunks', table.concat(ids, ','))
      return out
    end
    table.remove(tier, pick)
  end
end
if (ARGV[12] or '') ~= '' then redis.call('ZADD', K('idle'), ARGV[12], wid .. '/' .. ARGV[10]) end
return {}
"""

# ARGV: ns waiter score -- a task process about to wait for work (see go_idle)
_IDLE = _PRELUDE + r"""
go_idle(ARGV[2], ARGV[3])
return 1
"""

# ARGV: ns worker job ttl maxlen nparts waiter score, then the result message's nparts
#   elements (protocol.encode_result: several when it is big), then (entry n_done n_failed
#   final) per chunk; waiter: "" or a slot about to wait, which goes idle after the outcomes
#   (go_idle: one script where two would cost a call each)
_COMPLETE = _PRELUDE + r"""
local wid, job = ARGV[2], ARGV[3]
local nparts = tonumber(ARGV[6])
local jk = K('job', job)
-- nil when the job is gone (it expired with its executor): nothing is counted or sent, and
-- no key of the job is made again (it would have no TTL)
local meta = redis.call('HMGET', jk, 'client', 'grace', 'state', 'keep')
local client = meta[1]
-- a cancelled job's unfinished items were counted as cancelled when it was cancelled, and its
-- client cancelled their futures: what its tasks report now is neither counted nor sent
if meta[3] == 'cancelled' then client = nil end
-- unread results live as long as the job would without its client (its grace), not a day
local ttl = meta[4] or meta[2] or ARGV[4]  -- (a kept job's: its keep grace)
local ak = K('attempts', job)
-- chunks its client stopped (stop_chunks counted their items as cancelled and cancelled
-- their futures): what they report is not counted (the message still goes: it may carry
-- other chunks' outcomes; the client ignores a stopped chunk's)
local sk = K('stop', job)
local stops = redis.call('EXISTS', sk) == 1
local done, failed, reported = 0, 0, 0
for i = 9 + nparts, #ARGV, 4 do
  local entry = ARGV[i]
  local chunk, nframes, items = parse(entry)
  local nd, nf = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local counts = true
  if stops and redis.call('SISMEMBER', sk, chunk) == 1 then
    counts = false
    nd, nf = 0, 0
  end
  reported = reported + nd + nf
  local field = job .. '/' .. chunk
  if ARGV[i + 3] == '1' then
    if redis.call('HDEL', K('wip', wid), field) == 0 then
      -- we were taken for dead and the chunk was requeued
      if redis.call('LREM', K('q', job), 1, entry) == 1 then
        -- its copy never ran: undo the requeue's bookkeeping and count this run, with what
        -- it reported before (taken out of the counters by the requeue) and since
        if client then
          redis.call('HINCRBY', jk, 'queued', -items)
          redis.call('HINCRBY', jk, 'running', items)
          local s = redis.call('HMGET', ak, 'sd' .. chunk, 'sf' .. chunk)
          nd, nf = nd + (tonumber(s[1]) or 0), nf + (tonumber(s[2]) or 0)
        end
      else
        counts = false  -- another worker took the copy; its run is the one counted
      end
    end
    redis.call('HDEL', K('tasks', job), unpack(payload_fields(chunk, nframes)))
  elseif client and nd + nf > 0 then  -- a part of a chunk (a slow one), still running
    if redis.call('HEXISTS', K('wip', wid), field) == 1 then
      -- remembered, so that a rerun (after this worker is lost) does not count it twice
      redis.call('HINCRBY', ak, 'd' .. chunk, nd)
      redis.call('HINCRBY', ak, 'f' .. chunk, nf)
    else  -- taken for dead: counted only if this run ends up the one that counts (above)
      redis.call('HINCRBY', ak, 'sd' .. chunk, nd)
      redis.call('HINCRBY', ak, 'sf' .. chunk, nf)
      counts = false
    end
  end
  if counts then
    done = done + nd
    failed = failed + nf
  end
end
-- the worker's tasks_done (items it finished: not those a cancel interrupted), live: its
-- heartbeat's info would be a second late
if reported > 0 and meta[3] ~= 'cancelled' and redis.call('EXISTS', K('worker', wid)) == 1 then
  redis.call('HINCRBY', K('worker', wid), 'tasks_done', reported)
end
if client then
  redis.call('HINCRBY', jk, 'running', -(done + failed))
  if done > 0 then redis.call('HINCRBY', jk, 'done', done) end
  if failed > 0 then redis.call('HINCRBY', jk, 'failed', failed) end
  if nparts > 0 and meta[4] then
    -- a kept job: the message is stored for attachers, its client gets a pointer to it
    local fields = {}
    for i = 9, 8 + nparts do fields[#fields + 1] = 'p'; fields[#fields + 1] = ARGV[i] end
    local id = redis.call('XADD', K('out', job), '*', unpack(fields))
    redis.call('EXPIRE', K('out', job), meta[4])
    redis.call('RPUSH', K('res', client), 'P' .. job .. '|' .. id)
    redis.call('EXPIRE', K('res', client), ttl)
  elseif nparts > 0 then  -- 0: the message went to the client directly (miniray.values.inbox)
    -- one push: a message's parts stay together in the list
    redis.call('RPUSH', K('res', client), unpack(ARGV, 9, 8 + nparts))
    redis.call('EXPIRE', K('res', client), ttl)
  end
  event(job, ARGV[5], 'kind', failed > 0 and 'failed' or 'finished', 'worker', wid,
        'done', done, 'failed', failed)
  if meta[4] then finish_kept(job, ARGV[5]) end
end
if ARGV[7] ~= '' then go_idle(ARGV[7], ARGV[8]) end
return 1
"""

# ARGV: ns job entry
_CANCEL_CHUNK = _PRELUDE + r"""
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
_STOP_CHUNKS = _PRELUDE + r"""
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
_CANCEL_JOB = _PRELUDE + r"""
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

# ARGV: ns worker info_json ttl stall rejoin job1 job2 ... -> {server_time, cancelled jobs...,
#   "job/chunk" per chunk its client stopped (stop:{job}) of the open ones}
_HEARTBEAT = _PRELUDE + r"""
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
_REAP = _PRELUDE + r"""
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
_RELEASE = _PRELUDE + r"""
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

# ARGV: ns job total maxlen -- a kept job's client submits no more: ``total`` items in all
#   (the job ends once they all have: finish_kept)
_SEAL = _PRELUDE + r"""
local jk = K('job', ARGV[2])
if redis.call('HGET', jk, 'state') ~= 'open' then return 0 end
redis.call('HSET', jk, 'sealed', 1, 'total', ARGV[3])
finish_kept(ARGV[2], ARGV[4])
return 1
"""


# Cached map items (miniray.cache). ARGV: ns ttl max_bytes, then member value pairs (member:
# "<fn>:<arg>", value: the pickled result) -> how many entries were evicted. Accounting and
# eviction happen here, in one step, so the total stays exact under concurrent writers: the
# entries past their TTL leave first, then each new entry is stored and the oldest are evicted
# while the total passes max_bytes (an entry larger than max_bytes is not stored).
_CACHE_STORE = _PRELUDE + r"""
local ttl, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local idx, sizes, total_key = K('cache', 'index'), K('cache', 'sizes'), K('cache', 'bytes')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local total = tonumber(redis.call('GET', total_key)) or 0
local function drop(member)
  total = total - (tonumber(redis.call('HGET', sizes, member)) or 0)
  redis.call('HDEL', sizes, member)
  redis.call('ZREM', idx, member)
  redis.call('DEL', K('cache', member))
end
local function score(t) return string.format('%.6f', t) end  -- (tostring keeps 14 digits)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', score(now - ttl), 'LIMIT', 0,
                              1000)) do
  drop(m)
end
local evicted = 0
for i = 4, #ARGV - 1, 2 do
  local m, v = ARGV[i], ARGV[i + 1]
  if #v <= cap then
    if redis.call('ZSCORE', idx, m) then drop(m) end
    redis.call('SET', K('cache', m), v, 'EX', ttl)
    -- (a microsecond apart: the entries of one batch keep their order)
    redis.call('ZADD', idx, score(now + (i - 4) / 2000000), m)
    redis.call('HSET', sizes, m, #v)
    total = total + #v
    while total > cap do
      local oldest = redis.call('ZRANGE', idx, 0, 0)
      if #oldest == 0 then break end
      drop(oldest[1])
      evicted = evicted + 1
    end
  end
end
if total < 0 then total = 0 end
redis.call('SET', total_key, total)
return evicted
"""

# ARGV: ns -> how many cached entries there were (not yet expired); the cache is then empty
_CACHE_CLEAR = _PRELUDE + r"""
local idx = K('cache', 'index')
local n = 0
for _, m in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
  n = n + redis.call('DEL', K('cache', m))
end
redis.call('DEL', idx, K('cache', 'sizes'), K('cache', 'bytes'))
return n
"""


def job_ttl(grace: float) -> int:
    """Seconds an open job's keys live unless its executor renews them: a minute past the
    client's grace (``MINIRAY_CLIENT_GRACE_SECONDS``)."""
    return max(1, round(grace)) + 60


def parse_claim(claimed: list) -> tuple:
    """A claim script's reply as ``(job, spec bytes, [(entry, chunk id, frames)])``."""
    job, spec, out, i = claimed[0].decode(), claimed[1], [], 2
    while i < len(claimed):
        entry = claimed[i].decode()
        chunk_id, nframes, _ = Keys.parse_entry(entry)
        out.append((entry, chunk_id, claimed[i + 1 : i + 1 + nframes]))
        i += 1 + nframes
    return job, spec, out


def connect(url: str) -> Connection:
    """A connection to ``url`` (``redis://`` or ``unix://``), checked with PING."""
    try:
        client = Connection(url)
    except ValueError as e:
        raise ConfigurationError(
            f"cannot use the Redis URL {redact(url)!r}: {e}. Give redis://:PASSWORD@HOST:PORT "
            "or unix:///path/to/socket?password=PASSWORD"
        ) from None
    try:
        client.ping()
    except ReplyError as e:
        raise ServerError(
            f"the server at {redact(url)} refused us: {e}. Check the password in the URL "
            "(MINIRAY_REDIS_URL or redis_url=...)"
        ) from None
    except RedisError as e:
        err = ServerError(
            f"cannot reach the server at {redact(url)}: {e}. Is it running? Leave the address "
            "unset to start a private local cluster instead."
        )
        err.unreachable = True
        raise err from None
    return client


_redact = redact


class Broker:
    """The scripts bound to one Redis client and namespace.

    Scripts are loaded once (SCRIPT LOAD) and then called by hash: redis-py's own Script
    objects would send a SCRIPT EXISTS before every pipeline, a round trip per hop.
    """

    _SOURCES = {"publish": _PUBLISH, "publish_one": _PUBLISH_ONE, "claim": _CLAIM,
                "idle": _IDLE, "complete": _COMPLETE,
                "cancel_chunk": _CANCEL_CHUNK, "stop_chunks": _STOP_CHUNKS,
                "cancel_job": _CANCEL_JOB, "seal": _SEAL,
                "heartbeat": _HEARTBEAT, "reap": _REAP, "release": _RELEASE,
                "cache_store": _CACHE_STORE, "cache_clear": _CACHE_CLEAR}
    _SHAS: dict = {}

    def __init__(self, client: Connection, namespace: str = "miniray", load: bool = True):
        """``load=False``: trust that the scripts are on the server (a task process, whose
        worker loaded them); a caller that gets NoScriptError calls ``load_scripts``."""
        self.r = client
        self.keys = Keys(namespace)
        self.ns = namespace
        if load:
            self.load_scripts()
        elif not Broker._SHAS:
            Broker._SHAS.update({name: hashlib.sha1(src.encode()).hexdigest()
                                 for name, src in self._SOURCES.items()})

    def load_scripts(self) -> None:
        pipe = self.r.pipeline()
        for src in self._SOURCES.values():
            pipe.command("SCRIPT", "LOAD", src)
        for name, sha in zip(self._SOURCES, pipe.execute()):
            Broker._SHAS[name] = sha.decode() if isinstance(sha, bytes) else sha

    def _run(self, name: str, args: list, pipe=None):
        """Run script ``name``; queued on ``pipe`` when given, else at once (reloading the
        scripts once if the server lost them, e.g. after a restart)."""
        if pipe is not None:
            return pipe.command("EVALSHA", self._SHAS[name], 0, *args)
        try:
            return self.r.execute("EVALSHA", self._SHAS[name], 0, *args)
        except NoScriptError:
            self.load_scripts()
            return self.r.execute("EVALSHA", self._SHAS[name], 0, *args)

    # -- executor side -------------------------------------------------------------------
    def create_job(self, pipe, job: str, client: str, name: str, priority: int, spec: dict,
                   requirements: dict, created: float, grace: float = 600.0,
                   keep: float | None = None) -> None:
        """A new open job. ``grace``: how long the cluster keeps it, and its client's unread
        results, while it hears nothing from the client (see ``client:{client}``); ``keep``:
        a kept job's grace instead (it is not given up, see ``miniray.client.keep``)."""
        k = self.keys
        fields = {
            "client": client, "name": name, "priority": priority, "state": "open",
            "created": created, "spec": json.dumps(spec), "queued": 0, "running": 0,
            "done": 0, "failed": 0, "cancelled": 0, "grace": max(1, round(grace)),
            **requirements,
        }
        if keep is not None:
            fields["keep"] = max(1, round(keep))
        pipe.command("HSET", k.job(job), *[x for kv in fields.items() for x in kv])
        # renewed by the executor while it lives; outlives the client key, so that a claim
        # finds the job of a silent client and gives it up
        pipe.command("EXPIRE", k.job(job), job_ttl(grace if keep is None else keep))
        pipe.command("ZADD", k.jobs_all, created, job)
        pipe.command("ZREMRANGEBYRANK", k.jobs_all, 0, -1001)  # the newest 1000 jobs

    def publish(self, pipe, job: str, priority: int, n_chunks: int, n_items: int,
                maxlen: int) -> None:
        self._run("publish", [self.ns, job, priority, n_chunks, n_items, maxlen], pipe)

    def publish_one(self, pipe, job: str, priority: int, entry: str, payload,
                    maxlen: int) -> None:
        """Store and publish one chunk of one frame, handed to a waiting slot when one can
        run it (see _PUBLISH_ONE)."""
        self._run("publish_one", [self.ns, job, priority, entry, payload, maxlen], pipe)

    def cancel_chunk(self, job: str, entry: str) -> bool:
        return bool(self._run("cancel_chunk", [self.ns, job, entry]))

    def stop_chunks(self, job: str, entries: list, maxlen: int = 10000) -> set:
        """Stop these chunks of the open ``job``: queued ones are withdrawn, those a worker
        holds are interrupted (or dropped unstarted) by it once its heartbeat hears of them;
        their items count as cancelled. Returns the chunk ids stopped or withdrawn (not those
        that had finished)."""
        if not entries:
            return set()
        return {int(c) for c in self._run("stop_chunks", [self.ns, job, maxlen, *entries])}

    def cancel_job(self, job: str, state: str = "cancelled", maxlen: int = 10000,
                   pipe=None) -> list:
        """Close ``job`` (``state``), dropping its queued chunks; returns their entries (none
        when queued on ``pipe``)."""
        args = [self.ns, job, state, maxlen]
        if pipe is not None:
            self._run("cancel_job", args, pipe)
            return []
        return [e.decode() for e in self._run("cancel_job", args) or []]

    def cache_store(self, ttl: int, max_bytes: int, entries: list) -> int:
        """Store cached item results, ``entries`` [(member ``"<fn>:<arg>"``, pickled value)],
        each kept ``ttl`` s, evicting the oldest while they pass ``max_bytes`` in all;
        returns how many were evicted (see miniray.cache)."""
        args = [self.ns, ttl, max_bytes]
        for member, value in entries:
            args += (member, value)
        return self._run("cache_store", args)

    def cache_clear(self) -> int:
        """Empty the item cache; returns how many entries it had."""
        return self._run("cache_clear", [self.ns])

    def seal(self, job: str, total: int, maxlen: int = 10000) -> bool:
        """A kept job takes no more items (``total`` in all); False when it is not open."""
        return bool(self._run("seal", [self.ns, job, total, maxlen]))

    # -- worker side ---------------------------------------------------------------------
    def claim(self, worker: str, max_chunks: int, name: str, host: str, free_gpus: int,
              cpus: int, pipe=None, gpu_free_mb=(), triton: bool = False, slot: int = 0,
              maxlen: int = 10000, register: bool = False, known: str = ""):
        """Take up to ``max_chunks`` chunks of the best job this worker can run now (and
        record their "started" event, ``maxlen`` bounding the job's event stream). With
        ``register``, a slot that finds nothing is registered as idle in the same step, so
        the next work published wakes it (the newest registration first). ``known``:
        ``",job=n,..."``, how many chunks of each job to take at most; one of any other job
        ("": ``max_chunks`` of any job)."""
        return self._run("claim", [self.ns, worker, max_chunks, name, host, free_gpus, cpus,
                                   ",".join(map(str, gpu_free_mb)) if gpu_free_mb else "",
                                   "1" if triton else "0", slot, maxlen,
                                   repr(time.time()) if register else "", known], pipe)

    def idle(self, pipe, waiter: str) -> None:
        """A slot about to wait: wake itself if work is queued, else register as idle."""
        self._run("idle", [self.ns, waiter, repr(time.time())], pipe)

    def complete(self, pipe, worker: str, job: str, chunks: list, ttl: int, maxlen: int,
                 msg: list, idle: str = "") -> None:
        """Report finished items: ``chunks`` is [(entry, n_done, n_failed, final)]; ``msg``
        (the elements of one result message, see ``protocol.encode_result``) goes to the
        client's results ([]: it went there past the server, see ``miniray.values.inbox``). With
        ``idle`` (a waiter) that slot then goes idle, as ``idle`` would have it."""
        args = [self.ns, worker, job, ttl, maxlen, len(msg), idle,
                repr(time.time()) if idle else "", *msg]
        for entry, n_done, n_failed, final in chunks:
            args += [entry, n_done, n_failed, int(final)]
        self._run("complete", args, pipe)

    def heartbeat(self, worker: str, info: dict, ttl: int, jobs=(), pipe=None,
                  stall: float | None = None, rejoin: bool = False):
        """Record a worker's heartbeat (``info``, kept ``ttl`` s); returns the server's time,
        which of ``jobs`` are no longer open, then ``b"job/chunk"`` for each chunk of the others
        that its client stopped (see ``stop_chunks``). A gap over ``stall`` seconds since anyone's
        last heartbeat or reap is taken for a stopped server (see ``tick`` in the scripts):
        by default half the dead timeout, which ``ttl`` is three times. ``rejoin``: the worker
        has heartbeaten before, so if it is not registered it was reaped while it lived, and
        its idle slots are woken to register again."""
        if stall is None:
            stall = ttl / 6
        return self._run("heartbeat", [self.ns, worker, json.dumps(info), ttl, stall,
                                       "1" if rejoin else "0", *jobs], pipe)

    def reap(self, dead_after: float, max_retries: int, maxlen: int, ttl: int, pipe=None):
        return self._run("reap", [self.ns, dead_after, max_retries, maxlen, ttl], pipe)

    def release(self, worker: str) -> int:
        return self._run("release", [self.ns, worker])
