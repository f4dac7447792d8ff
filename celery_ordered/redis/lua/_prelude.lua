-- _prelude.lua: not a script. protocol.py puts it in front of every script when
-- it loads one, so the scripts share one clock, one way to wake a waiter and
-- one way to renew their keys' expiry. It defines local functions only: it
-- reads no KEYS or ARGV and writes nothing by itself.

-- Redis's clock in ms (TIME: seconds and microseconds).
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Leave a wake token in the list `key`: a waiter blocked on it (BLPOP) wakes,
-- and a token already there is left alone, so tokens never pile up.
local function wake(key)
  if redis.call('LLEN', key) == 0 then
    redis.call('RPUSH', key, 1)
  end
end

-- Make each key given after `ttl` live `ttl` ms from now (`ttl` as ARGV holds it:
-- 0 means the keys live forever, and nothing is done). A missing key stays missing.
local function refresh(ttl, ...)
  local ms = tonumber(ttl)
  if ms > 0 then
    for _, key in ipairs({...}) do
      redis.call('PEXPIRE', key, ms)
    end
  end
end

