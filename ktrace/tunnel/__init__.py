"""The tunnel to the agent: one gRPC channel, a stream per TCP connection and UDP socket."""

import ktrace_agent.grpc_setup as _grpc_setup  # noqa: F401  # gRPC core settings, before grpc is imported
