-- pop.lua: acknowledge what the consumer delivered, then read the contiguous
-- run of outcomes that follows what it has already read. Only the consumer
-- holding the consumer lease may do either: the lease has an epoch, and a
-- consumer whose epoch is not the current one was fenced by a successor.
--
-- KEYS[1]  next      string  consumer cursor: every number below it is delivered
-- KEYS[2]  results   hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[3]  closed    string  the number of claims when the stream was closed
-- KEYS[4]  space     list    wake token for blocked producers
-- KEYS[5]  ready     list    wake token for a blocked consumer
-- KEYS[6]  window    string  the cap (returned, so the consumer knows when to acknowledge)
-- KEYS[7]  seq       string  next number to claim (checks the acknowledgement)
-- KEYS[8]  created   string  the stream's incarnation id
-- KEYS[9]  consumer  hash    the consumer lease: 'epoch', 'owner', 'until' (ms)
-- KEYS[10] error     string  the producer's error, if it closed the stream with one
-- KEYS[11] adapt     hash    'floor', 'ceiling', 'why' of an adaptive window (absent: fixed)
-- KEYS[12] pending   hash    the 'n:' 't:' 'w:' 'h:' 'b:' fields of a filled number stay
--                            here until this script acknowledges it (publish.lua)
-- KEYS[13] deadlines zset    numbers scored by when they count as lost
-- KEYS[14..] the stream's other keys when ARGV[4] renews: a renewing call renews them all
-- ARGV[1]  ack       every number below it has been delivered; -1: keep the cursor
-- ARGV[2]  from      first number to read; -1 (or anything below the cursor): the cursor
-- ARGV[3]  max       most outcomes to return
-- ARGV[4]  ttl       ms every key of the stream lives after its last use (0: forever);
--                    negative: renew no key, give -ttl ms to a key this call creates
-- ARGV[5]  incarnation the id of KEYS[8] the consumer opened the stream with
-- ARGV[6]  owner     the calling consumer's id (host, pid and handle)
-- ARGV[7]  epoch     the caller's lease epoch; 0: acquire the lease (a new epoch)
-- ARGV[8]  lease     ms the lease lasts from now
-- ARGV[9]  mode      '': nothing more; 'take': acquire even while another consumer's
--                    lease is live (fencing it); 'free': release the lease after this call
-- ARGV[10] waited    '1' if the caller waited for outcomes before this call (it lingered,
--                    or waited on KEYS[5]): see the adaptive window below
--
-- Returns {next, closed (-1 if open), stored, from, window, epoch, claimed, error,
--          member1, member2, ...}:
-- `stored` counts the outcomes still held after the acknowledgement, `epoch` is the
-- caller's lease epoch, `claimed` the numbers claimed so far, `error` the producer's
-- error ('' if none, or while `from` is below `closed`), and the members are those
-- of numbers from, from+1, ... with no gap. Error replies, on which nothing is written:
--   "DELETED"                   KEYS[8] is not ARGV[5]: the stream was deleted (or
--                               Redis lost it, or it expired) since the caller opened it
--   "LEASED <ms left> <owner>"  acquiring, but another consumer's lease is live
--   "FENCED <epoch> <owner>"    the caller's epoch is not the current one
--   "ROLLBACK <seq>"            ARGV[1] acknowledges numbers never claimed: the
--                               stream's state went back in time (a failover that lost writes)
if redis.call('GET', KEYS[8]) ~= ARGV[5] then
  return redis.error_reply('DELETED')
end
local now = now_ms()
local epoch = tonumber(redis.call('HGET', KEYS[9], 'epoch') or '0')
local mine = tonumber(ARGV[7])
if mine == 0 then
  local owner = redis.call('HGET', KEYS[9], 'owner') or '-'
  local lease_end = tonumber(redis.call('HGET', KEYS[9], 'until') or '0')
  if lease_end > now and owner ~= ARGV[6] and ARGV[9] ~= 'take' then
    return redis.error_reply('LEASED ' .. (lease_end - now) .. ' ' .. owner)
  end
elseif mine ~= epoch then
  return redis.error_reply('FENCED ' .. epoch .. ' ' .. (redis.call('HGET', KEYS[9], 'owner') or '-'))
end
local cursor = redis.call('GET', KEYS[1])
local nxt = tonumber(cursor or '0')
local ack = tonumber(ARGV[1])
local claimed = tonumber(redis.call('GET', KEYS[7]) or '0')
if ack > claimed then
  return redis.error_reply('ROLLBACK ' .. claimed)
end
if mine == 0 then
  epoch = epoch + 1
  redis.call('HSET', KEYS[9], 'epoch', epoch, 'owner', ARGV[6])
end
if ARGV[9] == 'free' then
  redis.call('HSET', KEYS[9], 'until', 0)
else
  redis.call('HSET', KEYS[9], 'until', now + tonumber(ARGV[8]))
end
-- What the window held before this call's acknowledgement (see the adaptive window below).
local held = claimed - nxt
if ack > nxt then
  -- The outcomes delivered, and what else their numbers left: in one command
  -- per key for a block of numbers (slices keep unpack() within Lua's stack).
  for first = nxt, ack - 1, 1000 do
    local numbers, fields = {}, {}
    for n = first, math.min(ack, first + 1000) - 1 do
      local key = tostring(n)  -- formatted once (each number .. string formats it anew)
      numbers[#numbers + 1] = key
      fields[#fields + 1] = 't:' .. key
      fields[#fields + 1] = 'n:' .. key
      fields[#fields + 1] = 'w:' .. key
      fields[#fields + 1] = 'h:' .. key
      fields[#fields + 1] = 'b:' .. key
    end
    redis.call('HDEL', KEYS[2], unpack(numbers))
    redis.call('HDEL', KEYS[12], unpack(fields))
    redis.call('ZREM', KEYS[13], unpack(numbers))
  end
  redis.call('SET', KEYS[1], ack, 'KEEPTTL')
  if not cursor then
    expire_new(ARGV[4], KEYS[1])  -- a new key (renewed below too, if this call renews)
  end
  nxt = ack
  wake(KEYS[4], ARGV[4])
end
local from = tonumber(ARGV[2])
if from < nxt then
  from = nxt
end
refresh(ARGV[4], unpack(KEYS))
local closed = tonumber(redis.call('GET', KEYS[3]) or '-1')
local err = ''
if closed >= 0 and from >= closed then
  err = redis.call('GET', KEYS[10]) or ''
end
local window = tonumber(redis.call('GET', KEYS[6]) or '0')
local stored = redis.call('HLEN', KEYS[2])
local reply = {nxt, closed, stored, from, window, epoch, claimed, err}
-- The run from `from` is no longer than what is stored.
local last = from + math.min(tonumber(ARGV[3]), stored) - 1
local found = filled_run(KEYS[2], from, last, reply)
-- An adaptive window (see docs/how-it-works.md), like TCP's congestion window:
-- it doubles when the consumer, asking for outcomes, finds its head missing or
-- had to wait for it (ARGV[10]), while the window is full (the window, not the
-- consumer, holds work back: the workers may sit idle), and shrinks by a
-- quarter when every place is taken by an outcome waiting for the consumer
-- (the consumer is the limit). Full here means more than half in use, as this
-- call found it before its own acknowledgement: a consumer acknowledges in
-- batches and as it is about to wait, so the places it frees in this very call
-- would otherwise always hide a full window, and map() claims only once half
-- the window is free, so it never takes the last places.
if tonumber(ARGV[3]) > 0 and window > 0 and redis.call('EXISTS', KEYS[11]) == 1 then
  local floor, ceiling = unpack(redis.call('HMGET', KEYS[11], 'floor', 'ceiling'))
  floor, ceiling = tonumber(floor), tonumber(ceiling)
  local resized, why = nil, nil
  if (found == 0 or (ARGV[10] == '1' and stored < window)) and closed < 0
     and held * 2 > window and window < ceiling then
    resized = math.min(ceiling, window * 2)
    why = 'grew to ' .. resized .. ': the consumer waited for number ' .. from ..
          ' with the window full'
  elseif found > 0 and stored >= window and window > floor then
    resized = math.max(floor, window - math.floor(window / 4))
    why = 'shrank to ' .. resized .. ': ' .. stored .. ' outcomes waited for the consumer'
  end
  if resized then
    resize_window(KEYS[6], KEYS[11], resized, why)
    reply[5] = resized
    if resized > window then
      wake(KEYS[4], ARGV[4])  -- blocked producers: there is room now
    end
  end
end
return reply
