"""The Lua helpers every broker script starts with (``PRELUDE``): key names, chunk entries,
waking idle slots, the server's clock, requeueing a lost chunk, ending a kept job.

Each script in ``lua_client``, ``lua_worker``, ``lua_cache`` and ``lua_liveness`` is this text
followed by its own body, so a helper changed here changes every script (and its SHA).
"""

__all__ = ["PRELUDE"]

# Shared Lua helpers. `entry` is "<chunk>:<nframes>:<items>".
PRELUDE = r"""
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
