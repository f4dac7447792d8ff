-- reclaim.lua: find the claimed numbers whose outcome cannot come unless they are
-- dispatched again, and decide for each whether to dispatch it again or to give up
-- on it as lost. A number a live worker holds (its lease is renewed) is never one.
--
-- KEYS[1]  next       string  consumer cursor: every number below it is delivered
-- KEYS[2]  results    hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[3]  pending    hash    number -> dispatch record ("<lane>:<status>:..."); per number
--                             'n:' re-dispatches, 't:' claim time (ms), 'h:' the lease of
--                             the worker holding it, 'w:' where it waits after a re-dispatch
-- KEYS[4]  deadlines  zset    unfilled numbers scored by when to look at them next (ms): a
--                             held number's lease lapses then, another's lane may be idle
-- KEYS[5]  counters   hash    'redispatched' and 'lost': counts over the stream's life
-- KEYS[6]  seq        string  next number to claim
-- KEYS[7]  lanes      hash    lane -> "<highest number received>|<last activity, ms>"
-- KEYS[8]  created    string  the stream's incarnation id
-- KEYS[9..] the stream's other keys, renewed with these when ARGV[8] renews
-- ARGV[1]  lost_after ms a number no worker holds may wait while its lane shows no progress
-- ARGV[2]  limit      most re-dispatches of one number before it is given up
-- ARGV[3]  max        most numbers to act on in this call
-- ARGV[4]  ttl        ms every key of the stream lives after its last use (0: forever)
-- ARGV[5]  overtaken  ms a number no worker received may stay behind a later number of
--                     its lane that a worker did receive
-- ARGV[6]  scan       most numbers from the consumer's position checked for overtaking
-- ARGV[7]  incarnation the id of KEYS[8] the caller opened the stream with ('': not checked)
-- ARGV[8]  renew      ARGV[4], when this call renews every key given (the caller does
--                     so once in a while); -ARGV[4] (or 0) when it does not
--
-- A number is acted on when
--   'lapsed'     the worker holding it stopped renewing its lease (it died, froze or
--                lost its network);
--   'overtaken'  no worker holds it, and a number sent after it to the same lane (queue
--                and priority) was received by a worker more than ARGV[5] ms ago: queues
--                are first in, first out, so its message was lost (purged, expired, lost
--                with a broker, or its producer died before sending it);
--   'idle'       no worker holds it, and neither it nor its lane has shown progress for
--                ARGV[1] ms (no worker serves the queue, or every message was lost).
-- Returns {verdict1, number1, record1, why1, verdict2, ...}, where verdict is 'retry'
-- (dispatch the record again) or 'lost' (re-dispatched ARGV[2] times already: fill the
-- number with a lost error, through publish) and why is one of the reasons above.
-- Either way the number counts as queued again from now, behind every number claimed so
-- far, and its deadline moves on by ARGV[1], so no other caller acts on it meanwhile.
-- An error reply "DELETED" when KEYS[8] is not ARGV[7]: the stream was deleted (and
-- maybe created again) since the caller opened it; nothing is written then.
if ARGV[7] ~= '' and redis.call('GET', KEYS[8]) ~= ARGV[7] then
  return redis.error_reply('DELETED')
end
local now = now_ms()
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local claimed = tonumber(redis.call('GET', KEYS[6]) or '0')
local lost_after = tonumber(ARGV[1])
local most = tonumber(ARGV[3])
local reply = {}
local acted = {}
local count = 0

local function unfilled(n)
  if n < nxt or redis.call('HEXISTS', KEYS[2], n) == 1 then
    return nil
  end
  return redis.call('HGET', KEYS[3], n)
end

local function forget(n)
  -- Filled or delivered meanwhile: nothing waits on it any more.
  redis.call('HDEL', KEYS[3], n, 'n:' .. n, 't:' .. n, 'w:' .. n, 'h:' .. n, 'b:' .. n)
  redis.call('ZREM', KEYS[4], n)
end

local function act(n, record, why)
  acted[n] = true
  count = count + 1
  -- Queued again from now, behind every number claimed so far; no worker holds it.
  redis.call('HSET', KEYS[3], 'w:' .. n, (claimed - 1) .. '|' .. now .. '|0')
  redis.call('HDEL', KEYS[3], 'h:' .. n)
  redis.call('ZADD', KEYS[4], now + lost_after, n)
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
  reply[#reply + 1] = n
  reply[#reply + 1] = record
  reply[#reply + 1] = why
end

-- Where a number no worker holds waits: behind which number (itself, until it is
-- dispatched again), since when, and when it was first seen overtaken (0: not yet).
local function waits(n)
  local w = redis.call('HGET', KEYS[3], 'w:' .. n)
  if w then
    local behind, since, over = string.match(w, '^(%-?%d+)|(%d+)|(%d+)$')
    return tonumber(behind), tonumber(since), tonumber(over)
  end
  return n, tonumber(redis.call('HGET', KEYS[3], 't:' .. n) or now), 0
end

-- 1. Numbers overtaken in their lane, from the consumer's position up to the highest
-- number any lane received.
local lanes = {}
local top = -1
local flat = redis.call('HGETALL', KEYS[7])
for i = 1, #flat, 2 do
  local high, active = string.match(flat[i + 1], '^(%-?%d+)|(%d+)$')
  lanes[flat[i]] = {tonumber(high), tonumber(active)}
  top = math.max(top, tonumber(high))
end
local last = math.min(top, nxt + tonumber(ARGV[6]) - 1)
for n = nxt, last do
  if count >= most then
    break
  end
  if not acted[n] then
    local record = redis.call('HGET', KEYS[3], n)
    if record and redis.call('HEXISTS', KEYS[3], 'h:' .. n) == 0 then
      local lane, status = string.match(record, '^([^:]*):([^:]*):')
      local info = lanes[lane]
      if status == 'T' and info then
        local behind, since, over = waits(n)
        if info[1] > behind and redis.call('HEXISTS', KEYS[2], n) == 0 then
          if over == 0 then
            redis.call('HSET', KEYS[3], 'w:' .. n, behind .. '|' .. since .. '|' .. now)
          elseif now - over >= tonumber(ARGV[5]) then
            act(n, record, 'overtaken')
          end
        end
      end
    end
  end
end

-- 2. Numbers whose deadline passed: a lease that lapsed, or a lane that may be idle.
-- A page at a time: every number looked at leaves the due ones (forgotten when
-- filled, its deadline moved on otherwise), so each page holds new ones. A
-- filled number keeps its deadline until the consumer acknowledges it
-- (pop.lua removes it then), so behind a lost head a whole window of filled
-- numbers may be due with it: paging on, they cannot hide it. At most 20
-- pages per call.
local pages = 0
while count < most and pages < 20 do
  pages = pages + 1
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, most)
  for _, member in ipairs(due) do
    local n = tonumber(member)
    if count >= most then
      break
    end
    if not acted[n] then
      local record = unfilled(n)
      local lease = record and redis.call('HGET', KEYS[3], 'h:' .. n)
      if not record then
        forget(n)
      elseif lease then
        local lapses = tonumber(string.match(lease, '^(%d+)|'))
        if lapses <= now then
          act(n, record, 'lapsed')
        else
          redis.call('ZADD', KEYS[4], lapses, n)
        end
      else
        local _, since = waits(n)
        local lane = string.match(record, '^([^:]*):')
        local info = lanes[lane]
        local quiet = since
        if info and string.match(record, '^[^:]*:T:') then
          quiet = math.max(since, info[2])
        end
        if now - quiet >= lost_after then
          act(n, record, 'idle')
        else
          redis.call('ZADD', KEYS[4], quiet + lost_after, n)
        end
      end
    end
  end
  if #due < most then
    break
  end
end
if count > 0 then
  refresh(ARGV[4], KEYS[5])
end
refresh(ARGV[8], unpack(KEYS))
return reply
