"""The scripts of a worker's task slots: taking work (``claim``), waiting for it (``idle``)
and reporting what was done (``complete``, which also sends the result message on).

Each is ``PRELUDE`` (``lua_prelude``) and its body; the comment above it names its ARGV.
"""

from .lua_prelude import PRELUDE

__all__ = ["CLAIM", "IDLE", "COMPLETE"]

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
CLAIM = PRELUDE + r"""
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
IDLE = PRELUDE + r"""
go_idle(ARGV[2], ARGV[3])
return 1
"""

# ARGV: ns worker job ttl maxlen nparts waiter score, then the result message's nparts
#   elements (protocol.encode_result: several when it is big), then (entry n_done n_failed
#   final) per chunk; waiter: "" or a slot about to wait, which goes idle after the outcomes
#   (go_idle: one script where two would cost a call each)
COMPLETE = PRELUDE + r"""
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
