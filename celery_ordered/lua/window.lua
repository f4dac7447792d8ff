-- window.lua: store the window cap and wake blocked producers to look at it.
--
-- KEYS[1]  window  string  the cap on (seq - next)
-- KEYS[2]  space   list    wake token for blocked producers
-- ARGV[1]  window  the cap to store
-- ARGV[2]  only    1: store it only if the stream has no cap yet; 0: replace the cap
-- ARGV[3]  ttl     ms every key of the stream lives after its last use (0: forever)
--
-- Returns the cap in force afterwards.
if ARGV[2] == '0' or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('RPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], 0, 0)
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  for i = 1, #KEYS do
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return tonumber(redis.call('GET', KEYS[1]))
