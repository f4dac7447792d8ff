-- publish.lua: store the outcome of one claimed number; the first outcome wins.
--
-- KEYS[1]  seq        string  next number to claim (numbers below it were claimed)
-- KEYS[2]  next       string  consumer cursor: every number below it is delivered
-- KEYS[3]  results    zset    outcomes scored by their number
-- KEYS[4]  ready      list    wake token for a blocked consumer
-- KEYS[5]  closed     string  the number of claims when the stream was closed
-- KEYS[6]  done       list    wake token for join(): every claimed number is filled
-- KEYS[7]  pending    hash    number -> dispatch record (and its 'n:' 't:' 'w:' 'h:' 'b:'
--                             fields), until filled
-- KEYS[8]  deadlines  zset    numbers scored by when they count as lost
-- KEYS[9]  created    string  the stream's incarnation id
-- ARGV[1]  number     the sequence number this outcome fills
-- ARGV[2]  member     the encoded outcome ("<number>:<status>:<type>:<encoding>:<body>")
-- ARGV[3]  ttl        ms every key of the stream lives after its last use (0: forever)
-- ARGV[4]  incarnation the id of KEYS[9] the number was claimed in ('': not checked)
--
-- Returns 1 when stored, 0 when dropped as a duplicate or as late (already
-- delivered), -1 when the number was never claimed in this incarnation of the
-- stream (say, the stream was deleted, or deleted and created again).
local n = tonumber(ARGV[1])
if n >= tonumber(redis.call('GET', KEYS[1]) or '0') then
  return -1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[9]) ~= ARGV[4] then
  return -1
end
-- Whatever happens to this outcome, the number no longer waits for one.
redis.call('HDEL', KEYS[7], n, 'n:' .. n, 't:' .. n, 'w:' .. n, 'h:' .. n, 'b:' .. n)
redis.call('ZREM', KEYS[8], n)
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
if n < nxt or redis.call('ZCOUNT', KEYS[3], n, n) > 0 then
  return 0
end
redis.call('ZADD', KEYS[3], n, ARGV[2])
if n == nxt then
  wake(KEYS[4])
end
local closed = redis.call('GET', KEYS[5])
if closed and nxt + redis.call('ZCARD', KEYS[3]) >= tonumber(closed) then
  wake(KEYS[6])
end
refresh(ARGV[3], unpack(KEYS))
return 1
