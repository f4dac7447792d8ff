-- pop.lua: acknowledge what the consumer delivered, then read the contiguous
-- run of outcomes that follows what it has already read.
--
-- KEYS[1]  next     string  consumer cursor: every number below it is delivered
-- KEYS[2]  results  zset    outcomes scored by their number
-- KEYS[3]  closed   string  the number of claims when the stream was closed
-- KEYS[4]  space    list    wake token for blocked producers
-- KEYS[5]  ready    list    wake token for a blocked consumer
-- KEYS[6]  window   string  the cap (returned, so the consumer knows when to acknowledge)
-- KEYS[7]  seq      string  next number to claim (checks the acknowledgement)
-- ARGV[1]  ack      every number below it has been delivered; -1: keep the cursor
-- ARGV[2]  from     first number to read; -1 (or anything below the cursor): the cursor
-- ARGV[3]  max      most outcomes to return
-- ARGV[4]  ttl      ms every key of the stream lives after its last use (0: forever)
--
-- Returns {next, closed (-1 if open), stored, from, window, member1, member2, ...}:
-- `stored` counts the outcomes still held after the acknowledgement, and the
-- members are those of numbers from, from+1, ... with no gap. An error reply
-- "ROLLBACK <seq>" when ARGV[1] acknowledges numbers never claimed: the
-- stream's state went back in time (a failover that lost writes) or was deleted.
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local ack = tonumber(ARGV[1])
local claimed = tonumber(redis.call('GET', KEYS[7]) or '0')
if ack > claimed then
  return redis.error_reply('ROLLBACK ' .. claimed)
end
if ack > nxt then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ack)
  redis.call('SET', KEYS[1], ack)
  nxt = ack
  if redis.call('LLEN', KEYS[4]) == 0 then
    redis.call('RPUSH', KEYS[4], 1)
  end
end
local from = tonumber(ARGV[2])
if from < nxt then
  from = nxt
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, #KEYS do
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
local reply = {nxt, tonumber(redis.call('GET', KEYS[3]) or '-1'),
               redis.call('ZCARD', KEYS[2]), from,
               tonumber(redis.call('GET', KEYS[6]) or '0')}
local found = redis.call('ZRANGEBYSCORE', KEYS[2], from, from + tonumber(ARGV[3]) - 1,
                         'WITHSCORES')
local expected = from
for i = 1, #found, 2 do
  if tonumber(found[i + 1]) ~= expected then
    break
  end
  reply[#reply + 1] = found[i]
  expected = expected + 1
end
return reply
