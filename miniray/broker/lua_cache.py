"""The scripts of the item cache (``miniray.client.cache``): storing a batch with its TTL and
size bound (``cache_store``), and emptying it (``cache_clear``).

Each is ``PRELUDE`` (``lua_prelude``) and its body; the comment above it names its ARGV.
"""

from .lua_prelude import PRELUDE

__all__ = ["CACHE_STORE", "CACHE_CLEAR"]

# Cached map items (miniray.cache). ARGV: ns ttl max_bytes, then member value pairs (member:
# "<fn>:<arg>", value: the pickled result) -> how many entries were evicted. Accounting and
# eviction happen here, in one step, so the total stays exact under concurrent writers: the
# entries past their TTL leave first, then each new entry is stored and the oldest are evicted
# while the total passes max_bytes (an entry larger than max_bytes is not stored).
CACHE_STORE = PRELUDE + r"""
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
CACHE_CLEAR = PRELUDE + r"""
local idx = K('cache', 'index')
local n = 0
for _, m in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
  n = n + redis.call('DEL', K('cache', m))
end
redis.call('DEL', idx, K('cache', 'sizes'), K('cache', 'bytes'))
return n
"""
