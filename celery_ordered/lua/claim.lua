-- claim.lua: claim up to ARGV[1] consecutive sequence numbers, if the window allows.
--
-- KEYS[1]  seq      string  next number to claim
-- KEYS[2]  next     string  consumer cursor: every number below it is delivered
-- KEYS[3]  window   string  the cap on (seq - next)
-- KEYS[4]  closed   string  present once the stream is closed
-- KEYS[5]  space    list    wake token for blocked producers
-- ARGV[1]  wanted   how many numbers the caller would like (>= 1)
-- ARGV[2]  default  window to store when KEYS[3] is absent
--
-- Returns {first, count}:
--   count >= 1   numbers first .. first+count-1 now belong to the caller
--   count == 0   the window is full: wait on KEYS[5] and try again
--   first == -1  the stream is closed: nothing was claimed
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {-1, 0}
end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
local window = tonumber(redis.call('GET', KEYS[3]) or '0')
if window == 0 then
  window = tonumber(ARGV[2])
  redis.call('SET', KEYS[3], window)
end
local room = window - (seq - nxt)
if room <= 0 then
  return {seq, 0}
end
local count = math.min(tonumber(ARGV[1]), room)
redis.call('SET', KEYS[1], seq + count)
if room > count and redis.call('LLEN', KEYS[5]) == 0 then
  -- Room is left: pass the wake-up on to any other blocked producer.
  redis.call('RPUSH', KEYS[5], 1)
end
return {seq, count}
