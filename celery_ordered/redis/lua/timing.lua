-- timing.lua: note the run times of some of a hedged stream's tasks, so that a waiting
-- consumer knows how long its typical task runs (see hedge.lua).
--
-- KEYS[1]  timing   hash    a ring of the last 64 run times (ms): fields '0'..'63', and
--                           'i', how many were ever noted
-- KEYS[2]  created  string  the stream's incarnation id
-- ARGV[1]  incarnation the id of KEYS[2] the tasks were claimed in
-- ARGV[2]  ttl      ms every key of the stream lives after its last use (0: forever)
-- ARGV[3]  count    how many run times follow
-- ARGV[4..3+count]  run times, in ms
--
-- Returns how many run times were ever noted. An error reply "DELETED" when KEYS[2]
-- is not ARGV[1]; nothing is written then.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('DELETED')
end
local i = tonumber(redis.call('HGET', KEYS[1], 'i') or '0')
for j = 4, 3 + tonumber(ARGV[3]) do
  redis.call('HSET', KEYS[1], i % 64, ARGV[j])
  i = i + 1
end
redis.call('HSET', KEYS[1], 'i', i)
refresh(ARGV[2], KEYS[1])
return i
