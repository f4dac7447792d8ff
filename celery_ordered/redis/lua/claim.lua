-- claim.lua: claim up to ARGV[1] consecutive sequence numbers, if the window allows,
-- and record what each number is for, so that lost work can be dispatched again.
--
-- KEYS[1]  seq        string  next number to claim
-- KEYS[2]  next       string  consumer cursor: every number below it is delivered
-- KEYS[3]  window     string  the cap on (seq - next)
-- KEYS[4]  closed     string  present once the stream is closed
-- KEYS[5]  space      list    wake token for blocked producers
-- KEYS[6]  pending    hash    number -> dispatch record, and 't:<number>' -> when it
--                             was claimed (ms), until its outcome arrives
-- KEYS[7]  deadlines  zset    numbers scored by when they count as lost (ms), and SKIPLIST
--                             (+inf: see below)
-- KEYS[8]  producers  hash    producer id -> "<claim id>:<first>:<count>:<ms>" of its last
--                             claim (past 1,000 of them, pruned to the last 10 minutes)
-- KEYS[9]  created    string  the stream's incarnation id, written when it was created
-- KEYS[10] results    hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[11] adapt      hash    'floor', 'ceiling', 'why' of an adaptive window (absent: fixed)
-- KEYS[12..] the stream's other keys when ARGV[4] renews: a renewing call renews them all
-- ARGV[1]  wanted     how many numbers the caller would like (>= 1)
-- ARGV[2]  default    window to store when KEYS[3] is absent
-- ARGV[3]  lost_after ms after which an unfilled number counts as lost (0: never)
-- ARGV[4]  ttl        ms every key of the stream lives after its last use (0: forever);
--                     negative: renew no key, give -ttl ms to a key this call creates
-- ARGV[5]  producer   id of the calling producer (one per process, thread and stream)
-- ARGV[6]  claim id   unique per call: a retry of this call (its reply lost to a
--                     connection error) returns the same numbers, never new ones
-- ARGV[7]  incarnation the id of KEYS[9] the caller opened the stream with
-- ARGV[8..7+wanted]   one dispatch record per wanted number
--
-- Returns {first, count}:
--   count >= 1   numbers first .. first+count-1 now belong to the caller
--   count == 0   the window is full: wait on KEYS[5] and try again
--   first == -1  the stream is closed: nothing was claimed
-- An error reply "DELETED" when KEYS[9] is not ARGV[7]: the stream was deleted
-- (or Redis lost it, or it expired) since the caller opened it. Nothing is
-- written then: a claim never creates a stream the caller did not open.
if redis.call('GET', KEYS[9]) ~= ARGV[7] then
  return redis.error_reply('DELETED')
end
local prior = redis.call('HGET', KEYS[8], ARGV[5])
if prior then
  local id, first, count = string.match(prior, '^([^:]+):(%d+):(%d+)')
  if id == ARGV[6] then
    return {tonumber(first), tonumber(count)}
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {-1, 0}
end
local seq_was = redis.call('GET', KEYS[1])
local seq = tonumber(seq_was or '0')
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
local window = tonumber(redis.call('GET', KEYS[3]) or '0')
if window == 0 then
  window = tonumber(ARGV[2])
  redis.call('SET', KEYS[3], window)
  expire_new(ARGV[4], KEYS[3])
end
local room = window - (seq - nxt)
-- Head-of-line blocking: the window is full, its first number is missing, and
-- at least half of it holds outcomes that finished behind that number. The
-- workers that ran them may sit idle while this producer would wait (nothing
-- wakes a consumer waiting for the head): an adaptive window grows here, by the
-- same doubling as the consumer's (pop.lua), and this claim goes on.
if room <= 0 and redis.call('EXISTS', KEYS[11]) == 1 then
  local stored = redis.call('HLEN', KEYS[10])
  local ceiling = tonumber(redis.call('HGET', KEYS[11], 'ceiling'))
  if stored * 2 >= window and window < ceiling
     and redis.call('HEXISTS', KEYS[10], nxt) == 0 then
    local grown = math.min(ceiling, window * 2)
    resize_window(KEYS[3], KEYS[11], grown, 'grew to ' .. grown .. ': number ' .. nxt ..
                  ' held the window full with ' .. stored .. ' outcomes waiting behind it')
    room = room + grown - window
  end
end
if room <= 0 then
  return {seq, 0}
end
local count = math.min(tonumber(ARGV[1]), room)
redis.call('SET', KEYS[1], seq + count, 'KEEPTTL')
if not seq_was then
  expire_new(ARGV[4], KEYS[1])
end
local lost_after = tonumber(ARGV[3])
-- Between renewals (a negative ttl) only a key this call creates gets an expiry.
local renewing = tonumber(ARGV[4]) >= 0
local new_pending = not renewing and redis.call('EXISTS', KEYS[6]) == 0
local new_deadlines = not renewing and lost_after > 0 and redis.call('EXISTS', KEYS[7]) == 0
local new_producers = not renewing and redis.call('EXISTS', KEYS[8]) == 0
local now = now_ms()
-- Each number is formatted once, as a string: a number joined to a string (..)
-- is formatted anew each time, and that, not the commands, was most of the cost.
local now_s, due_s = tostring(now), tostring(now + lost_after)
-- One HSET and one ZADD for a block of numbers (each redis.call costs more than
-- the work it does), in slices that keep unpack() within Lua's stack.
--
-- The first ZADD also writes the member SKIPLIST, scored +inf: never due, so
-- reclaim never reads it. Longer than Redis's zset-max-listpack-value (64
-- bytes by default), it keeps `deadlines` a skiplist: Redis would keep a
-- window's few dozen deadlines in a listpack, whose every insert walks the
-- whole set, and a ZADD per number cost four times what it costs a skiplist.
-- A sorted set never goes back to a listpack, so once per key would do; once
-- per claim costs less than finding out whether it is there.
local SKIPLIST = 'celery-ordered: a member over 64 bytes keeps this sorted set a skiplist'
for from = 0, count - 1, 1000 do
  local fields, deadlines = {}, {}
  if from == 0 then
    deadlines[1], deadlines[2] = '+inf', SKIPLIST
  end
  for i = from, math.min(count, from + 1000) - 1 do
    local key = tostring(seq + i)
    fields[#fields + 1] = key
    fields[#fields + 1] = ARGV[8 + i]
    fields[#fields + 1] = 't:' .. key
    fields[#fields + 1] = now_s
    deadlines[#deadlines + 1] = due_s
    deadlines[#deadlines + 1] = key
  end
  redis.call('HSET', KEYS[6], unpack(fields))
  if lost_after > 0 then
    redis.call('ZADD', KEYS[7], unpack(deadlines))
  end
end
-- A retry of this very call (its reply lost) gets the same numbers back.
local added = redis.call('HSET', KEYS[8], ARGV[5], ARGV[6] .. ':' .. seq .. ':' .. count .. ':' .. now)
-- A retry comes within seconds of its call. A stream fed by a new handle per request
-- (one producer id each) would keep an entry per producer for its whole life: past a
-- thousand, each new producer removes the entries over ten minutes old among a
-- hundred sampled (HRANDFIELD, Redis 6.2; an older Redis keeps them all), which
-- holds the hash near the producers of the last ten minutes at a bounded cost.
if added == 1 and redis.call('HLEN', KEYS[8]) > 1000 then
  local ok, sample = pcall(redis.call, 'HRANDFIELD', KEYS[8], 100, 'WITHVALUES')
  if ok then
    local old = {}
    for i = 1, #sample, 2 do
      local at = tonumber(string.match(sample[i + 1], '^[^:]+:%d+:%d+:(%d+)$') or '0')
      if now - at > 600000 then
        old[#old + 1] = sample[i]
      end
    end
    if #old > 0 then
      redis.call('HDEL', KEYS[8], unpack(old))
    end
  end
end
if new_pending then expire_new(ARGV[4], KEYS[6]) end
if new_deadlines then expire_new(ARGV[4], KEYS[7]) end
if new_producers then expire_new(ARGV[4], KEYS[8]) end
if room > count then
  -- Room is left: pass the wake-up on to any other blocked producer.
  wake(KEYS[5], ARGV[4])
end
refresh(ARGV[4], unpack(KEYS))
return {seq, count}
