-- Publish a whole epoch's recommendations only as the current leader (one call, atomic).
-- KEYS[1] = eq:{u}:leader, KEYS[2..n+1] = the n recommendation streams.
-- ARGV[1] = holder id, ARGV[2] = its token, ARGV[3] = MAXLEN (approximate),
-- ARGV[4] = f, the fields of every entry, ARGV[5..4+f] = their names, in entry order,
-- ARGV[5+f..4+2f] = the value each field has in every entry ('' where each entry gives its own),
-- ARGV[5+2f] = v, how many fields each entry gives, ARGV[6+2f..5+2f+v] = their positions (1..f),
-- ARGV[6+2f+v] = the values the entries give, v per entry, entry after entry in the order of
-- KEYS, as one MessagePack array of strings (one argument, not v per entry: packing thousands of
-- arguments was most of a signaler's cost of publishing an epoch to 1,000 sidecars),
-- ARGV[7+2f+v] = the streams' time to live in ms (renewed by each append: the stream of a
-- sidecar that is gone expires).
-- Returns false when fenced off (nothing appended); else per entry its id, or '!' and the error
-- of that stream alone (a key of the wrong type: the other entries are still appended).
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then
  return false
end
local f = tonumber(ARGV[4])
local v = tonumber(ARGV[5 + 2 * f])
local values = cmsgpack.unpack(ARGV[6 + 2 * f + v])
if type(values) ~= 'table' or #values ~= (#KEYS - 1) * v then
  return redis.error_reply('ERR batch: ' .. (#KEYS - 1) .. ' entries of ' .. v .. ' values expected')
end
local args = {'XADD', '', 'MAXLEN', '~', ARGV[3], '*'}
for i = 1, f do
  args[5 + 2 * i] = ARGV[4 + i]
  args[6 + 2 * i] = ARGV[4 + f + i]
end
local out = {}
for n = 2, #KEYS do
  args[2] = KEYS[n]
  for j = 1, v do
    args[6 + 2 * tonumber(ARGV[5 + 2 * f + j])] = values[(n - 2) * v + j]
  end
  local reply = redis.pcall(unpack(args))
  if type(reply) == 'table' and reply.err then
    out[n - 1] = '!' .. reply.err
  else
    redis.call('PEXPIRE', KEYS[n], ARGV[7 + 2 * f + v])
    out[n - 1] = reply
  end
end
return out
