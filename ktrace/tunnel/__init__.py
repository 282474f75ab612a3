"""The tunnel to the agent: one gRPC channel, a stream per TCP connection and UDP socket."""

import ktrace_agent.tuning as _tuning  # noqa: F401  # gRPC and malloc settings, before grpc is imported
