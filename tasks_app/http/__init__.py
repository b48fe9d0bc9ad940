"""Outbound HTTP for ``HTTP_REQUEST`` tasks: the SSRF guard, the guarded transport, the pooled
client and ``{"$secret": NAME}`` resolution.

``guard`` is the policy (stdlib and urllib3's URL parser only, so settings can use it);
``transport`` applies it where sockets are made; ``client`` owns the one ``requests.Session``
of a worker process; ``secrets`` binds secret references to their destinations and resolves
them when a request is made.
"""
