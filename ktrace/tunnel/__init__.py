"""The tunnel to the agent: one gRPC channel, a stream per TCP connection, UDP sessions on shared streams."""

import ktrace_agent.wire.tuning as _tuning  # noqa: F401  # gRPC and malloc settings, before grpc is imported
