-- Publish a recommendation only as the current leader (one round trip, atomic).
-- KEYS[1] = eq:{u}:leader, KEYS[2] = the stream; ARGV[1] = holder id, ARGV[2] = its token,
-- ARGV[3] = MAXLEN (approximate), ARGV[4..] = field, value, field, value, ...
-- Appends only while the caller still holds the lease under that token; returns the entry id,
-- or false when fenced off.
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then
  return false
end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do
  args[#args + 1] = ARGV[i]
end
return redis.call(unpack(args))
