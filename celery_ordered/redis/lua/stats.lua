-- stats.lua: a consistent snapshot of one stream.
--
-- KEYS[1]  seq      string  next number to claim
-- KEYS[2]  next     string  consumer cursor
-- KEYS[3]  window   string  the cap
-- KEYS[4]  results  hash    number -> outcome, for the numbers filled and not yet delivered
-- KEYS[5]  closed   string  the number of claims when closed
-- KEYS[6]  pending  hash    number -> dispatch record ("<lane>:<status>:..."); per number
--                           't:' claim time (ms), 'n:' re-dispatches, 'h:' its worker's
--                           lease, 'w:' where it waits after a re-dispatch, 'b:' its backup
-- KEYS[7]  created  string  the stream's incarnation id
-- KEYS[8]  counters hash    'redispatched', 'lost' and 'hedged' over the stream's life
-- KEYS[9]  deadlines zset   numbers scored by when their lane may count as idle (ms)
-- KEYS[10] lanes    hash    lane -> "<highest number received>|<last activity, ms>"
-- KEYS[11] adapt    hash    'floor', 'ceiling', 'why' of an adaptive window (absent: fixed)
--
-- Returns {claimed, next, window (0 if unset), stored, contiguous, closed (-1 if open),
--          now (ms), when the head-of-line blocker was claimed (ms, -1 if none),
--          the incarnation id ('' if the stream does not exist),
--          tasks dispatched again, places filled as lost, backups sent (hedging),
--          and of the blocker: its lane and status (from its record's prefix, '' if
--          none), its 'h:', 'w:' and 'b:' fields ('' if absent), its re-dispatches,
--          its deadline (ms, -1 if none) and its lane's entry in KEYS[10] ('' if none),
--          and what the adaptive window last did and why ('' if the window is fixed)}
-- where `contiguous` counts stored outcomes from `next` on with no gap, and the
-- head-of-line blocker is the first claimed number after them: the one
-- everything behind it waits for.
local now = now_ms()
local nxt = tonumber(redis.call('GET', KEYS[2]) or '0')
local stored = redis.call('HLEN', KEYS[4])
-- Every outcome stored is of a number at or past the cursor: the run from it
-- is no longer than what is stored.
local contiguous = filled_run(KEYS[4], nxt, nxt + stored - 1, {})
local head = nxt + contiguous
local record = redis.call('HGET', KEYS[6], head) or ''
local lane, status = string.match(record, '^([^:]*):([^:]*):')
local function field(prefix)
  return redis.call('HGET', KEYS[6], prefix .. head) or ''
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), nxt,
        tonumber(redis.call('GET', KEYS[3]) or '0'), stored, contiguous,
        tonumber(redis.call('GET', KEYS[5]) or '-1'),
        now, tonumber(redis.call('HGET', KEYS[6], 't:' .. head) or '-1'),
        redis.call('GET', KEYS[7]) or '',
        tonumber(redis.call('HGET', KEYS[8], 'redispatched') or '0'),
        tonumber(redis.call('HGET', KEYS[8], 'lost') or '0'),
        tonumber(redis.call('HGET', KEYS[8], 'hedged') or '0'),
        lane or '', status or '', field('h:'), field('w:'), field('b:'),
        tonumber(field('n:')) or 0,
        tonumber(redis.call('ZSCORE', KEYS[9], head) or '-1'),
        lane and redis.call('HGET', KEYS[10], lane) or '',
        redis.call('HGET', KEYS[11], 'why') or ''}
