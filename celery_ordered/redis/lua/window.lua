-- window.lua: open the stream (creating it, or attaching to it), and store the
-- window cap, waking blocked producers to look at it.
--
-- KEYS[1]  window   string  the cap on (seq - next)
-- KEYS[2]  space    list    wake token for blocked producers
-- KEYS[3]  created  string  the stream's incarnation id
-- KEYS[4]  seq      string  next number to claim (a stream made before incarnation ids has it)
-- KEYS[5]  adapt    hash    'floor', 'ceiling', 'why' of an adaptive window (absent: fixed)
-- KEYS[6..] the stream's other keys: a call that writes renews them all with these
-- ARGV[1]  window   the cap to store; 0: store none
-- ARGV[2]  only     1: store it only if the stream has no cap yet; 0: replace the cap
-- ARGV[3]  ttl      ms every key of the stream lives after its last use (0: forever)
-- ARGV[4]  incarnation the id the caller knows (mode 'known'), or a new one to give
--                   the stream if it has none (modes 'create' and 'attach')
-- ARGV[5]  mode     'create': create the stream if it does not exist;
--                   'attach': only if it exists (else nothing is written);
--                   'known': the stream must still be the incarnation ARGV[4]
-- ARGV[6]  ceiling  0: the cap stored is fixed (the user's); else the cap stored
--                   is the floor of an adaptive window that pop.lua may grow up
--                   to this ceiling
--
-- Returns {the cap in force (0 if none), the stream's incarnation id ('' when
-- 'attach' found no stream)}. An error reply "DELETED" in mode 'known' when
-- KEYS[3] is not ARGV[4]: the stream was deleted since the caller opened it.
local incarnation = redis.call('GET', KEYS[3])
-- Only a call that writes renews the expiry: attaching to look (create=False,
-- `ordered inspect`, a metrics scrape) must not keep an abandoned stream alive.
local wrote = false
if ARGV[5] == 'known' then
  if incarnation ~= ARGV[4] then
    return redis.error_reply('DELETED')
  end
elseif not incarnation then
  if ARGV[5] == 'attach' and redis.call('EXISTS', KEYS[1], KEYS[4]) == 0 then
    return {0, ''}
  end
  incarnation = ARGV[4]
  redis.call('SET', KEYS[3], incarnation)
  wrote = true
end
if ARGV[1] ~= '0' then
  if ARGV[2] == '0' or redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], ARGV[1])
    if ARGV[6] ~= '0' then
      redis.call('HSET', KEYS[5], 'floor', ARGV[1], 'ceiling', ARGV[6], 'why',
                 'starts at ' .. ARGV[1] .. ' and adapts up to ' .. ARGV[6])
    else
      redis.call('DEL', KEYS[5])
    end
  end
  wake(KEYS[2], ARGV[3])
  wrote = true
end
if wrote then
  refresh(ARGV[3], unpack(KEYS))
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), incarnation}
