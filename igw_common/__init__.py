"""What the gateway, the worker and the tools around them share: the config file and its schema per
component, logging, tracing setup and the process launcher. ``gateway`` and ``inference`` import this,
never each other (they meet only through the generated protos)."""
