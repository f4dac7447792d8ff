-- publish.lua: store the outcome of one claimed number; the first outcome wins.
--
-- KEYS[1]  seq        string  next number to claim (numbers below it were claimed)
-- KEYS[2]  next       string  consumer cursor: every number below it is delivered
-- KEYS[3]  results    hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[4]  ready      list    wake token for a blocked consumer
-- KEYS[5]  closed     string  the number of claims when the stream was closed
-- KEYS[6]  done       list    wake token for join(): every claimed number is filled
-- KEYS[7]  pending    hash    number -> dispatch record, until filled (its 'n:' 't:' 'w:'
--                             'h:' 'b:' fields stay until the consumer acknowledges it)
-- KEYS[8]  created    string  the stream's incarnation id
-- KEYS[9]  window     string  the cap on claims ahead of the consumer's cursor
-- KEYS[10] space      list    wake token for blocked producers
-- KEYS[11] adapt      hash    present while the window adapts (see claim.lua)
-- ARGV[1]  number     the sequence number this outcome fills
-- ARGV[2]  member     the encoded outcome ("<number>:<status>:<type>:<encoding>:<body>")
-- ARGV[3]  ttl        ms the stream's keys live after their last use (0: forever)
-- ARGV[4]  incarnation the id of KEYS[8] the number was claimed in ('': not checked)
--
-- Returns 1 when stored, 0 when dropped as a duplicate or as late (already
-- delivered), -1 when the number was never claimed in this incarnation of the
-- stream (say, the stream was deleted, or deleted and created again), -2 when
-- it was claimed in this incarnation (ARGV[4] given and found) yet the stream
-- has not claimed that far: its state went back in time (a failover to a
-- replica behind the primary that handed the number out).
--
-- It runs once per task, so it does as little as it can: one MGET reads the
-- four strings it needs, one HDEL both tells the first outcome and takes its
-- number off the ones waiting, one HSET stores it and one HLEN counts what is
-- stored; every other redis.call is rare (each costs more than its command).
-- It renews no key's expiry (the producer's claims and the consumer's pops
-- do, once per block), and leaves the number's other fields in `pending` and
-- its deadline to the consumer's pop, which removes them per block of numbers
-- it acknowledges (reclaim forgets a filled number it meets before then).
-- Only a key it creates (the results hash after the consumer emptied it, a
-- wake token) gets `ttl` here.
local n = tonumber(ARGV[1])
local seq, nxt, closed, created, window =
  unpack(redis.call('MGET', KEYS[1], KEYS[2], KEYS[5], KEYS[8], KEYS[9]))
if ARGV[4] ~= '' and created ~= ARGV[4] then
  return -1
end
if n >= tonumber(seq or '0') then
  return ARGV[4] ~= '' and -2 or -1
end
-- The first outcome of a number finds its record in `pending` and removes it:
-- the number no longer waits for one. A duplicate, or a late outcome (of a
-- number delivered since), finds none: claim writes a number's record once,
-- and nothing else writes it.
if redis.call('HDEL', KEYS[7], ARGV[1]) == 0 then
  return 0
end
nxt = tonumber(nxt or '0')
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local stored = redis.call('HLEN', KEYS[3])
if stored == 1 then
  expire_new(ARGV[3], KEYS[3])  -- a new hash
end
if n == nxt then
  wake(KEYS[4], ARGV[3])
end
if closed and nxt + stored >= tonumber(closed) then
  wake(KEYS[6], ARGV[3])
end
-- Half a full window now waits behind a missing head: a producer blocked on
-- the window may grow it (claim.lua). Said once, as the count crosses half.
window = tonumber(window or '0')
if n > nxt and stored == math.ceil(window / 2) and tonumber(seq) - nxt >= window
   and redis.call('EXISTS', KEYS[11]) == 1 then
  wake(KEYS[10], ARGV[3])
end
return 1
