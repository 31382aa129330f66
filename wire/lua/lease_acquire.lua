-- Take or renew the leader lease of one upstream, atomically (EVAL, two keys, two args).
-- KEYS[1] = eq:{u}:leader, KEYS[2] = eq:{u}:fence; ARGV[1] = holder id, ARGV[2] = ttl ms.
-- Returns the holder's fencing token (renewing its lease), or 0 if another holder leads.
-- A new leader always gets a strictly larger token than every leader before it, so readers
-- can refuse a deposed leader's late writes (reason "fenced").
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = string.match(current, '^(%S+) (%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
-- Lua numbers are doubles: past 2^53 a token is no longer exact (and '..' would print one of
-- 1e14 or more as '1e+14', which no lease check matches); such a fence is refused like a
-- counter that is no integer, which fails this upstream alone
if token > 9007199254740991 then
  return redis.error_reply('ERR fence value is not an integer below 2^53')
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', token), 'PX', ARGV[2])
return token
