-- reclaim.lua: find claimed numbers whose outcome is overdue, and decide for
-- each whether to dispatch it again or to give up on it as lost.
--
-- KEYS[1]  next       string  consumer cursor: every number below it is delivered
-- KEYS[2]  results    zset    outcomes scored by their number
-- KEYS[3]  pending    hash    number -> dispatch record; 'n:<number>' -> re-dispatches;
--                             't:<number>' -> first dispatch time (ms)
-- KEYS[4]  deadlines  zset    numbers scored by when they count as lost (ms)
-- KEYS[5]  counters   hash    'redispatched' and 'lost': counts over the stream's life
-- ARGV[1]  lost_after ms until a re-dispatched number counts as lost again
-- ARGV[2]  limit      most re-dispatches of one number before it is given up
-- ARGV[3]  max        most numbers to handle in this call
-- ARGV[4]  ttl        ms every key of the stream lives after its last use (0: forever)
--
-- Returns {verdict1, number1, record1, verdict2, ...}, oldest deadline first,
-- where verdict is 'retry' (dispatch the record again) or 'lost' (re-dispatched
-- ARGV[2] times already: fill the number with a lost error, through publish).
-- Either way the number's deadline moves on by ARGV[1], so no other caller
-- acts on it meanwhile, and it comes due again if this caller dies first.
local now = now_ms()
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local reply = {}
for _, member in ipairs(due) do
  local n = tonumber(member)
  local record = redis.call('HGET', KEYS[3], n)
  if n < nxt or not record or redis.call('ZCOUNT', KEYS[2], n, n) > 0 then
    -- Filled or delivered meanwhile: nothing waits on it any more.
    redis.call('HDEL', KEYS[3], n, 'n:' .. n, 't:' .. n)
    redis.call('ZREM', KEYS[4], n)
  else
    -- The deadline moves on either way: no other caller acts on this number
    -- now, and if this caller dies before acting, the number comes due again.
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[1]), n)
    local tries = redis.call('HINCRBY', KEYS[3], 'n:' .. n, 1)
    if tries > tonumber(ARGV[2]) then
      reply[#reply + 1] = 'lost'
      if tries == tonumber(ARGV[2]) + 1 then
        -- Counted once: a caller that dies before filling it gets 'lost' again.
        redis.call('HINCRBY', KEYS[5], 'lost', 1)
      end
    else
      reply[#reply + 1] = 'retry'
      redis.call('HINCRBY', KEYS[5], 'redispatched', 1)
    end
    refresh(ARGV[4], KEYS[5])
    reply[#reply + 1] = n
    reply[#reply + 1] = record
  end
end
return reply
