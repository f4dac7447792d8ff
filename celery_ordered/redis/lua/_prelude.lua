-- _prelude.lua: not a script. protocol.py puts the functions of it that a script
-- calls in front of that script when it loads one, so the scripts share one
-- clock, one way to wake a waiter, one way to renew their keys' expiry and one
-- way to read a run of outcomes. It defines local functions only, each ending
-- at an unindented `end` (protocol.py cuts it there): it reads no KEYS or ARGV
-- and writes nothing by itself.

-- Redis's clock in ms (TIME: seconds and microseconds).
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Give `key`, which the calling script has just created, the stream's expiry:
-- `ttl` ms, renewal or not (as ARGV holds it; 0: the key lives forever).
local function expire_new(ttl, key)
  local ms = math.abs(tonumber(ttl))
  if ms > 0 then
    redis.call('PEXPIRE', key, ms)
  end
end

-- Leave a wake token in the list `key`: a waiter blocked on it (BLPOP) wakes,
-- and a token already there is left alone, so tokens never pile up. A new
-- token makes a new list, which lives `ttl` ms (as ARGV holds it, a renewal
-- or not: see refresh; 0: forever).
local function wake(key, ttl)
  if redis.call('LLEN', key) == 0 then
    redis.call('RPUSH', key, 1)
    expire_new(ttl, key)
  end
end

-- Make each key given after `ttl` live `ttl` ms from now (`ttl` as ARGV holds it:
-- 0 means the keys live forever, and nothing is done). A missing key stays missing.
-- A negative `ttl` renews nothing: a frequent caller renews its keys once in a
-- while (protocol.py's renewal), and in between gives -ttl ms only to a key
-- its call creates.
local function refresh(ttl, ...)
  local ms = tonumber(ttl)
  if ms > 0 then
    for _, key in ipairs({...}) do
      redis.call('PEXPIRE', key, ms)
    end
  end
end

-- Resize an adaptive window to `size`, keeping the key's expiry, and say why in
-- the window's `adapt` hash: the one way claim and pop resize it.
local function resize_window(window_key, adapt_key, size, why)
  redis.call('SET', window_key, size, 'KEEPTTL')
  redis.call('HSET', adapt_key, 'why', why)
end

-- Append to `into` the outcomes the results hash `key` holds for the numbers
-- from `from` on, up to `last`, stopping at the first one missing, and return
-- how many it appended: one HMGET per slice of 1,000 (unpack() stays within
-- Lua's stack). The consumer's read and stats both read the filled run so.
local function filled_run(key, from, last, into)
  local n = from
  while n <= last do
    local wanted = {}
    for m = n, math.min(last, n + 999) do
      wanted[#wanted + 1] = m
    end
    for _, member in ipairs(redis.call('HMGET', key, unpack(wanted))) do
      if not member then
        return n - from
      end
      into[#into + 1] = member
      n = n + 1
    end
  end
  return n - from
end
