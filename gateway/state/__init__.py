"""State that outlives a request: quota, the response cache, sessions and jobs, each a store (memory
or Redis, Lua scripts in files) and the feature built on it."""
