-- Publish a recommendation only as the current leader (one round trip, atomic).
-- KEYS[1] = eq:{u}:leader, KEYS[2] = the stream; ARGV[1] = holder id, ARGV[2] = its token,
-- ARGV[3] = MAXLEN (approximate), ARGV[4] = the stream's time to live in ms (renewed by each
-- append: the stream of a sidecar that is gone expires), ARGV[5..] = field, value, ...
-- Appends only while the caller still holds the lease under that token; returns the entry id,
-- or false when fenced off.
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then
  return false
end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 5, #ARGV do
  args[#args + 1] = ARGV[i]
end
local id = redis.call(unpack(args))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return id
