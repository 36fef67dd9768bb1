-- KEYS: job, events. ARGV: token, error code, error message, events max length. Gives the run back (the
-- entry stays pending and is claimed again). Returns 1, or 0 if not the current run.
if redis.call('HGET', KEYS[1], 'st') ~= 'running' or redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'st', 'queued', 'tok', '', 'ecode', ARGV[2], 'emsg', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 't', 'q')
return 1
