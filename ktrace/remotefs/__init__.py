"""The target container's files on this machine (``ktrace run --target``).

| module | role |
|---|---|
| ``pathmap`` | pure: a path of the program -> its local copy, ``EROFS``, or not ours (what the tracer asks) |
| ``mirror`` | the private 0700 directory of copies, changed in place as the kubelet does; leftovers |
| ``session`` | ``RemoteFiles``: the agent's ``WatchFiles`` stream into the mirror, and the ``PathMap`` |
"""
