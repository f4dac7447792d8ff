-- hedge.lua: decide whether the number a consumer waits for has run so much longer
-- than the stream's typical task that a backup copy should be sent (hedging; for
-- idempotent tasks only). At most one backup is sent per number.
--
-- KEYS[1]  pending   hash    number -> dispatch record, 'h:<number>' the lease of the
--                            worker holding it, 'b:<number>' when its backup was sent
-- KEYS[2]  timing    hash    a ring of recent run times (ms), see timing.lua
-- KEYS[3]  counters  hash    'hedged': backup copies sent over the stream's life
-- KEYS[4]  created   string  the stream's incarnation id
-- ARGV[1]  number    the number the consumer waits for
-- ARGV[2]  factor    send the backup once it has run this many times the typical run time
-- ARGV[3]  waited    ms the consumer has waited for it (a lower bound of its run time)
-- ARGV[4]  samples   fewest run times noted before the typical one is trusted
-- ARGV[5]  ttl       ms every key of the stream lives after its last use (0: forever)
-- ARGV[6]  incarnation the id of KEYS[4] the caller opened the stream with ('': not checked)
--
-- Returns {typical run time in ms (-1: not known yet), its record if a backup is to be
-- sent now (else '')}. The typical run time is the median of the last 64 noted.
-- An error reply "DELETED" when KEYS[4] is not ARGV[6]: the stream was deleted (and
-- maybe created again) since the caller opened it; nothing is written then.
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then
  return redis.error_reply('DELETED')
end
local n = ARGV[1]
local samples = {}
local noted = tonumber(redis.call('HGET', KEYS[2], 'i') or '0')
if noted < tonumber(ARGV[4]) then
  return {-1, ''}
end
for i = 0, math.min(noted, 64) - 1 do
  samples[#samples + 1] = tonumber(redis.call('HGET', KEYS[2], i) or '0')
end
table.sort(samples)
local typical = samples[math.floor((#samples + 1) / 2)]
local record = redis.call('HGET', KEYS[1], n)
if not record or string.match(record, '^[^:]*:([^:]*):') ~= 'T'
    or redis.call('HEXISTS', KEYS[1], 'b:' .. n) == 1 then
  return {typical, ''}
end
local now = now_ms()
local ran = tonumber(ARGV[3])
local lease = redis.call('HGET', KEYS[1], 'h:' .. n)
if lease then
  local started = tonumber(string.match(lease, '^%d+|%a+|%-?%d+|(%-?%d+)|'))
  if started and started >= 0 then
    ran = math.max(ran, now - started)
  end
end
if ran < tonumber(ARGV[2]) * math.max(typical, 1) then
  return {typical, ''}
end
redis.call('HSET', KEYS[1], 'b:' .. n, now)
redis.call('HINCRBY', KEYS[3], 'hedged', 1)
refresh(ARGV[5], KEYS[3])
return {typical, record}
