"""ktrace's cluster half: the agent as a pod (or an ephemeral container of a target pod), the tunnel
to it through the API server's port-forward, and its clean removal.

Modules (only ``api`` imports the Kubernetes client, lazily, when ``--agent kube`` is used):

| module | role |
|---|---|
| ``options`` | what the CLI passes in (pure) |
| ``spec`` | the agent's pod / ephemeral container (pure) |
| ``target`` | ``--target`` parsing, a Deployment's pod (pure) |
| ``status`` | a pod's status → the agent's state, progress and failures (pure) |
| ``errors`` | API failures → one line with a hint (pure) |
| ``rights`` | the RBAC rights ktrace needs (pure; docs/rbac.yaml must match) |
| ``portforward`` | the local bridge, and the WebSocket port-forward's channel codec (pure) |
| ``spdy`` | the SPDY/3.1 framing of a port-forward (pure codec) |
| ``portforward_transports`` | a forwarded connection over SPDY or a WebSocket, as the bridge uses it |
| ``api`` | the only user of ``kubernetes.aio`` / aiohttp: kubeconfig, requests, watches, WebSockets, upgrades |
| ``watching`` | follow a pod through API server restarts; wait for the agent |
| ``session`` | one run's agent: create, wait, tunnel, watch, heartbeat, delete |
| ``cleanup`` | ``ktrace cleanup`` |
| ``podenv`` | a container's environment as the kubelet makes it (pure) |
| ``envlayer`` | the pod's environment over the local one, ``--env-*`` (pure) |
| ``mounts`` | which of the target's files the agent serves, and how (pure) |
| ``podview`` | ``--target``: the pod read once, its environment, its file plan |
| ``envcmd`` | ``ktrace env`` |
| ``doctor`` | context and RBAC checks for ``ktrace doctor`` |
"""
