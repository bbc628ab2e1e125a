-- auth_failure.lua (ratelimitd/abuse/stuffing.py): one failed key lookup or signature of an
-- address, counted, and the address blocked past the threshold.
-- KEYS: 1 the subject hash, 2 its failures; ARGV: clock, window ms, threshold, block ms,
-- reason, a unique member. Reply: {status, now, block end, failures in the window}
--   status: 0 counted, 1 counted and now blocked, 2 blocked already (not counted)
local K, F = KEYS[1], KEYS[2]
local ends = block_end(redis.call('HGET', K, 'b'))
if ends > now then return {2, now, ends, 0} end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', F, '-inf', now - window)
redis.call('ZADD', F, now, ARGV[6])
local n = redis.call('ZCARD', F)
if n > tonumber(ARGV[3]) then
  ends = now + tonumber(ARGV[4])
  set_block(K, ends, ARGV[5])
  redis.call('DEL', F)
  return {1, now, ends, n}
end
redis.call('PEXPIRE', F, window)
return {0, now, 0, n}
