-- Give the lease up (graceful shutdown) only if it is still ours.
-- KEYS[1] = eq:{u}:leader; ARGV[1] = holder id, ARGV[2] = its token. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
