-- close.lua: close the stream to further claims (idempotent), with the
-- producer's error if it stopped by failing.
--
-- KEYS[1]  seq      string  next number to claim
-- KEYS[2]  next     string  consumer cursor
-- KEYS[3]  results  hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[4]  closed   string  set here to the number of claims
-- KEYS[5]  ready    list    wake token for a blocked consumer
-- KEYS[6]  done     list    wake token for join()
-- KEYS[7]  space    list    wake token for blocked producers (they must see the close)
-- KEYS[8]  created  string  the stream's incarnation id
-- KEYS[9]  error    string  set here to ARGV[3], if this call closes the stream
-- KEYS[10..] the stream's other keys when ARGV[1] renews: a renewing call renews them all
-- ARGV[1]  ttl      ms every key of the stream lives after its last use (0: forever)
-- ARGV[2]  incarnation the id of KEYS[8] the caller opened the stream with
-- ARGV[3]  error    the producer's error, encoded ('': a normal end); kept only by
--                   the call that closes the stream (the first close wins)
--
-- Returns the number of claims at which the stream closed. An error reply
-- "DELETED" when KEYS[8] is not ARGV[2]: the stream was deleted (or Redis lost
-- it, or it expired) since the caller opened it; nothing is written then.
if redis.call('GET', KEYS[8]) ~= ARGV[2] then
  return redis.error_reply('DELETED')
end
local closed = redis.call('GET', KEYS[4])
if not closed then
  closed = redis.call('GET', KEYS[1]) or '0'
  redis.call('SET', KEYS[4], closed)
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[9], ARGV[3])
  end
end
wake(KEYS[5], ARGV[1])
wake(KEYS[7], ARGV[1])
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
if nxt + redis.call('HLEN', KEYS[3]) >= tonumber(closed) then
  wake(KEYS[6], ARGV[1])
end
refresh(ARGV[1], unpack(KEYS))
return tonumber(closed)
