-- lease.lua: a worker's heartbeat for the numbers of one stream it holds (received,
-- reserved or running), and the ones it stopped holding since its last heartbeat.
--
-- KEYS[1]  pending  hash    number -> dispatch record ("<lane>:<status>:..."), until filled;
--                           'h:<number>' is set here to the holder's lease, 'w:<number>'
--                           (where a number waits after a re-dispatch) removed
-- KEYS[2]  deadlines zset   unfilled numbers scored by when reclaim looks at them next:
--                           a held number's is when its lease lapses (ms)
-- KEYS[3]  lanes    hash    lane -> "<highest number received>|<last activity, ms>"
-- KEYS[4]  created  string  the stream's incarnation id
-- KEYS[5]  seq      string  next number to claim
-- KEYS[6..] the stream's other keys, renewed with these (see protocol.py's renewal)
-- ARGV[1]  incarnation the id of KEYS[4] the numbers were claimed in
-- ARGV[2]  ttl      ms every key of the stream lives after its last use (0: forever)
-- ARGV[3]  lease    ms the lease lasts from now
-- ARGV[4]  holder   who holds them: "<worker node name> <pid>"
-- ARGV[5]  held     how many numbers it holds (the entries that follow)
-- ARGV[6]  released the numbers it stopped holding without an outcome (its process was
--                   killed and the message given back to the broker, say), separated by
--                   spaces
-- ARGV[7..6+held]   one per number: "<number> <state> <ms since received> <ms since
--                   started> <lane>", the state 'received' or 'started' (then -1 ms: not
--                   started) for a number it holds, 'gone' for one it received since its
--                   last heartbeat and no longer holds (it finished); the lane as the
--                   task's message carried it (its dispatch record starts with it)
--
-- `h:<number>` holds "<lease lapses, ms>|<state>|<received, ms>|<started, ms or -1>|
-- <heartbeat, ms>|<holder>". A number already filled is left alone. A number given
-- back counts as queued again from now, behind every number claimed so far, unless
-- another holder has taken it meanwhile.
-- Returns how many of the numbers held still wait for their outcome. An error reply
-- "DELETED" when KEYS[4] is not ARGV[1]: the stream was deleted (or this is another
-- Redis than the producer's); nothing is written then.
if redis.call('GET', KEYS[4]) ~= ARGV[1] then
  return redis.error_reply('DELETED')
end
local now = now_ms()
local lapses = now + tonumber(ARGV[3])
local holder = ARGV[4]
local count = tonumber(ARGV[5])
local lanes = {}
local waiting = 0
for i = 7, 6 + count do
  local n, state, received, started, lane =
    string.match(ARGV[i], '^(%d+) (%a+) (%d+) (%-?%d+) (%S*)$')
  if lane ~= '' then
    lanes[lane] = math.max(lanes[lane] or -1, tonumber(n))
  end
  if state ~= 'gone' and redis.call('HEXISTS', KEYS[1], n) == 1 then
    waiting = waiting + 1
    started = tonumber(started)
    if started >= 0 then
      started = now - started
    end
    redis.call('HSET', KEYS[1], 'h:' .. n, lapses .. '|' .. state .. '|'
               .. (now - tonumber(received)) .. '|' .. started .. '|' .. now .. '|' .. holder)
    redis.call('HDEL', KEYS[1], 'w:' .. n)
    redis.call('ZADD', KEYS[2], lapses, n)
  end
end
-- Every lane a number was received from (or is held in) moved: note its highest
-- number received, and now as its last progress.
for lane, high in pairs(lanes) do
  local known = redis.call('HGET', KEYS[3], lane)
  if known then
    high = math.max(high, tonumber(string.match(known, '^(%-?%d+)|')))
  end
  redis.call('HSET', KEYS[3], lane, high .. '|' .. now)
end
local claimed = tonumber(redis.call('GET', KEYS[5]) or '0')
for n in string.gmatch(ARGV[6], '%d+') do
  local lease = redis.call('HGET', KEYS[1], 'h:' .. n)
  -- Only this holder's own lease: another worker may have the number by now.
  if lease and string.sub(lease, -(#holder + 1)) == '|' .. holder then
    redis.call('HDEL', KEYS[1], 'h:' .. n)
    if redis.call('HEXISTS', KEYS[1], n) == 1 then
      redis.call('HSET', KEYS[1], 'w:' .. n, (claimed - 1) .. '|' .. now .. '|0')
      redis.call('ZADD', KEYS[2], now, n)  -- the next reclaim decides what it waits on
    end
  end
end
refresh(ARGV[2], unpack(KEYS))
return waiting
